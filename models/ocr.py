"""PP-OCRv4 models (det / rec / cls) from rapidocr-onnxruntime==1.4.4, with rendered-text evaluators.

Models: ``fetch()`` copies the three ONNX files shipped inside the PyPI package rapidocr-onnxruntime==1.4.4
(``rapidocr_onnxruntime/models/``) to models/data/ocr/. The recognizer's character dictionary is stored in
the rec model itself, in metadata_props["character"] (6623 entries, one per line); like rapidocr's
CTCLabelDecode we put the CTC blank at index 0 and a space at the end (6625 classes = the rec output width).
fetch() also writes it out as ppocr_keys.txt, and ``charset()`` falls back to the original model's copy when a
rewritten model has lost its metadata.

Data: text lines rendered with PIL in the DejaVu fonts (Debian fonts-dejavu-core): random words of latin
letters and digits, mixed case, some ASCII punctuation (all of it is in the dictionary), dark ink on a light
background, cropped with a margin as the detector's boxes would be. Images are kept in BGR channel order as
rapidocr gets them from OpenCV (grey text, so the order only matters for exactness).

Preprocessing mirrors rapidocr 1.4.4 (its resize is cv2 INTER_LINEAR; we use PIL bilinear, which
agrees closely for the mild rescale of our ~48 px renders):
    rec:  height 48, width ceil(48 * w/h) (capped at the batch width), x/255, (x-0.5)/0.5, right-padded
          with 0 to the batch width int(48 * max(320/48, widest w/h in the batch)); batches of 6 sorted by
          aspect ratio.
    cls:  the same into a fixed [3, 48, 192].
    det:  (x/255 - 0.5)/0.5, NCHW. rapidocr would first rescale so the short side is 736 (limit_type "min");
          we render pages directly at a multiple-of-32 size (default 320x320) with 18-36 px text instead,
          which keeps the text scale the detector expects at a fraction of the cost.

Metrics (higher is better where the CLI needs it):
    cer(session)   character error rate in percent (Levenshtein / reference length, greedy CTC decode; lower
                   is better); score(session) = -cer(session) for ``--eval models.ocr:score``.
    det_iou(session)      pixel IoU (percent) of the unclipped detected boxes with the rendered text boxes.
    cls_accuracy(session) percent of lines whose 0/180 orientation is classified right.

Command line (from the repo root):
    python models/ocr.py fetch [--dest DIR]
    python models/ocr.py calib {rec,det,cls,rec-widths} OUT.npz [--n N] [--seed S]
    python models/ocr.py eval {rec,det,cls} MODEL.onnx [--n N]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import itertools
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / "data" / "ocr"
MODEL_FILES = {
    "det": "ch_PP-OCRv4_det_infer.onnx",
    "rec": "ch_PP-OCRv4_rec_infer.onnx",
    "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
}
INPUT_NAME = "x"  # the graph input name of all three models
REC_HEIGHT = 48
REC_MIN_WIDTH = 320  # rapidocr's rec_img_shape [3, 48, 320]: the narrowest batch width
REC_BATCH = 6  # rapidocr's rec_batch_num; batch composition changes padding, so keep it
CLS_SHAPE = (3, 48, 192)
DET_THRESH = 0.3  # rapidocr's DB binarisation threshold

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
# ExtraLight and the TeX math font are left out: hairline strokes and math glyphs are not what the model
# (or a document) usually sees, and they would make the baseline CER noisy.
FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSansCondensed.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerifCondensed.ttf",
    "DejaVuSansMono.ttf",
)
_LOWER = "abcdefghijklmnopqrstuvwxyz"
_UPPER = _LOWER.upper()
_DIGITS = "0123456789"


# ----------------------------------------------------------------------------------------------------------
# models and dictionary


def package_model_dir() -> Path:
    """rapidocr_onnxruntime/models inside site-packages (located without importing the package: no cv2)."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "rapidocr-onnxruntime is not installed; the PP-OCRv4 models come from it: "
            "`pip install rapidocr-onnxruntime==1.4.4` (or `pip install -e .[test]`)."
        )
    d = Path(next(iter(spec.submodule_search_locations))) / "models"
    missing = [f for f in MODEL_FILES.values() if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{d} lacks {missing}: install rapidocr-onnxruntime==1.4.4 exactly")
    return d


def fetch(dest_dir: str | Path | None = None) -> dict[str, Path]:
    """Copy det/rec/cls ONNX files (and the rec dictionary as ppocr_keys.txt) to ``dest_dir``.

    ``dest_dir`` defaults to models/data/ocr in this checkout. Returns {"det", "rec", "cls", "keys"} -> path.
    Files already there with the right size are not copied again.
    """
    src = package_model_dir()
    dest = Path(dest_dir) if dest_dir is not None else DATA_DIR
    dest.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for key, name in MODEL_FILES.items():
        target = dest / name
        if not target.is_file() or target.stat().st_size != (src / name).stat().st_size:
            shutil.copyfile(src / name, target)
        out[key] = target
    keys = dest / "ppocr_keys.txt"
    if not keys.is_file():
        keys.write_text("\n".join(_dictionary_from_model(src / MODEL_FILES["rec"])) + "\n", encoding="utf-8")
    out["keys"] = keys
    return out


def _dictionary_from_model(path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if "character" not in meta:
        raise KeyError(f"{path} has no metadata_props['character'] (the rec dictionary)")
    return meta["character"].splitlines()


@functools.lru_cache(maxsize=1)
def _original_charset() -> tuple[str, ...]:
    chars = _dictionary_from_model(package_model_dir() / MODEL_FILES["rec"])
    return ("<blank>", *chars, " ")


def charset(session: Any | None = None) -> list[str]:
    """CTC class list: index 0 = blank, then the dictionary, then " " (as rapidocr's CTCLabelDecode).

    Read from the session's model metadata when present; a rewritten model that dropped its metadata falls
    back to the original rec model's dictionary (the classes do not change under compression).
    """
    if session is not None:
        meta = session.get_modelmeta().custom_metadata_map
        if "character" in meta:
            return ["<blank>", *meta["character"].splitlines(), " "]
    return list(_original_charset())


def ctc_greedy_decode(probs: np.ndarray, chars: list[str]) -> list[str]:
    """Greedy CTC: argmax per time step, merge repeats, drop blanks (index 0). probs: [B, T, C]."""
    idx = np.asarray(probs).argmax(axis=2)
    out = []
    for row in idx:
        keep = np.ones(len(row), dtype=bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != 0
        out.append("".join(chars[i] for i in row[keep]))
    return out


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def char_error_rate(refs: list[str], hyps: list[str]) -> float:
    """Corpus CER in percent: total edit distance / total reference characters."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    total = sum(len(r) for r in refs)
    if total == 0:
        raise ValueError("empty references")
    return 100.0 * sum(levenshtein(r, h) for r, h in zip(refs, hyps, strict=True)) / total


# ----------------------------------------------------------------------------------------------------------
# rendering


@functools.lru_cache(maxsize=64)
def _font(name: str, size: int) -> Any:
    from PIL import ImageFont

    path = FONT_DIR / name
    if not path.is_file():
        raise FileNotFoundError(
            f"font {path} not found: install the Debian package fonts-dejavu-core "
            "(`apt-get install fonts-dejavu-core`)"
        )
    return ImageFont.truetype(str(path), size)


def _random_word(rng: np.random.Generator) -> str:
    kind = rng.choice(5, p=[0.4, 0.2, 0.15, 0.15, 0.1])
    length = int(rng.integers(2, 9))
    if kind == 0:
        return "".join(rng.choice(list(_LOWER), length))
    if kind == 1:
        return rng.choice(list(_UPPER)) + "".join(rng.choice(list(_LOWER), length - 1))
    if kind == 2:
        return "".join(rng.choice(list(_UPPER), length))
    if kind == 3:
        return "".join(rng.choice(list(_DIGITS), min(length, 6)))
    return "".join(rng.choice(list(_LOWER + _UPPER + _DIGITS), length))


def _random_text(rng: np.random.Generator, min_words: int = 2, max_words: int = 5) -> str:
    words = []
    for _ in range(int(rng.integers(min_words, max_words + 1))):
        w = _random_word(rng)
        r = rng.random()
        # Punctuation where it sits in real text (after a word, around it, inside it); all of it is ASCII
        # and in the dictionary.
        if r < 0.2:
            w += rng.choice(list(".,:;!?"))
        elif r < 0.25:
            w = f"({w})"
        elif r < 0.3:
            w = w + "-" + _random_word(rng)
        elif r < 0.33:
            w = w + rng.choice(["%", "&", "/", "#", "@"])
        words.append(w)
    return " ".join(words)


def _render_line(text: str, rng: np.random.Generator) -> np.ndarray:
    """One text line as a tight-ish crop, uint8 HxWx3 in BGR order."""
    from PIL import Image, ImageDraw

    font = _font(str(rng.choice(FONT_FILES)), int(rng.integers(26, 41)))
    ink = int(rng.integers(0, 70))
    paper = int(rng.integers(200, 256))
    ascent, descent = font.getmetrics()
    left, _, right, _ = font.getbbox(text)
    # Margins like a DB box after unclip (ratio 1.6): a few pixels to ~1/4 of the line height.
    mx = int(rng.integers(3, max(4, (ascent + descent) // 3)))
    my = int(rng.integers(2, max(3, (ascent + descent) // 5)))
    img = Image.new("L", (right - left + 2 * mx, ascent + descent + 2 * my), color=paper)
    ImageDraw.Draw(img).text((mx - left, my), text, font=font, fill=ink)
    rgb = np.asarray(img.convert("RGB"))
    return np.ascontiguousarray(rgb[:, :, ::-1])


def render_lines(
    n: int, seed: int = 0, min_words: int = 2, max_words: int = 5
) -> list[tuple[str, np.ndarray]]:
    """``n`` rendered text lines: (ground truth, uint8 HxWx3 BGR crop). Preprocess with ``rec_batch``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        text = _random_text(rng, min_words, max_words)
        out.append((text, _render_line(text, rng)))
    return out


def _resize_norm(img: np.ndarray, height: int, max_width: int) -> np.ndarray:
    """rapidocr's resize_norm_img without the padding: [3, height, w] float32 in [-1, 1]."""
    from PIL import Image

    h, w = img.shape[:2]
    resized_w = min(max_width, math.ceil(height * w / h))
    resized = np.asarray(Image.fromarray(img).resize((resized_w, height), Image.BILINEAR), dtype=np.float32)
    return (resized.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5


def rec_batch(images: list[np.ndarray], width: int | None = None) -> np.ndarray:
    """Preprocess crops for the recognizer as one batch: float32 [B, 3, 48, W], zero(-grey)-padded right.

    ``width=None`` picks rapidocr's batch width int(48 * max(320/48, widest aspect ratio)); a fixed width
    squeezes wider lines into it, as rapidocr does for a line wider than its batch width.
    """
    if width is None:
        max_ratio = max([REC_MIN_WIDTH / REC_HEIGHT] + [im.shape[1] / im.shape[0] for im in images])
        width = int(REC_HEIGHT * max_ratio)
    batch = np.zeros((len(images), 3, REC_HEIGHT, width), dtype=np.float32)
    for i, im in enumerate(images):
        x = _resize_norm(im, REC_HEIGHT, width)
        batch[i, :, :, : x.shape[2]] = x
    return batch


def cls_batch(images: list[np.ndarray]) -> np.ndarray:
    """Preprocess crops for the 0/180 classifier: float32 [B, 3, 48, 192]."""
    c, h, w = CLS_SHAPE
    batch = np.zeros((len(images), c, h, w), dtype=np.float32)
    for i, im in enumerate(images):
        x = _resize_norm(im, h, w)
        batch[i, :, :, : x.shape[2]] = x
    return batch


def render_pages(
    n: int, seed: int = 0, size: tuple[int, int] = (320, 320)
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` pages (H, W multiples of 32) of text lines stacked top to bottom.

    Returns (uint8 HxWx3 BGR page, int boxes [k, 4]): x0, y0, x1, y1 of each line's ink, clipped to the
    page.
    Lines never share rows, which ``det_iou`` relies on to assign predictions to lines.
    """
    from PIL import Image, ImageDraw

    h, w = size
    if h % 32 or w % 32:
        raise ValueError(f"det input sides must be multiples of 32, got {size}")
    rng = np.random.default_rng(seed)
    pages = []
    for _ in range(n):
        img = Image.new("L", (w, h), color=int(rng.integers(215, 256)))
        draw = ImageDraw.Draw(img)
        boxes = []
        y = int(rng.integers(4, 20))
        while True:
            font = _font(str(rng.choice(FONT_FILES)), int(rng.integers(18, 37)))
            text = _random_text(rng, 1, 4)
            left, top, right, bottom = font.getbbox(text)
            x = int(rng.integers(4, max(5, w // 3)))
            if y + bottom + 4 > h:
                break
            draw.text((x, y), text, font=font, fill=int(rng.integers(0, 70)))
            # Long lines may run off the right edge: the ground truth is what is visible.
            boxes.append((max(0, x + left), y + top, min(w, x + right), y + bottom))
            y += bottom + int(rng.integers(8, 30))
        rgb = np.asarray(img.convert("RGB"))
        pages.append((np.ascontiguousarray(rgb[:, :, ::-1]), np.array(boxes, dtype=np.int64).reshape(-1, 4)))
    return pages


def det_batch(images: list[np.ndarray]) -> np.ndarray:
    """Normalise equal-size pages as rapidocr's detector does: float32 [B, 3, H, W] = (x/255 - 0.5)/0.5."""
    x = np.stack(images).astype(np.float32).transpose(0, 3, 1, 2)
    return np.ascontiguousarray((x / 255.0 - 0.5) / 0.5)


# ----------------------------------------------------------------------------------------------------------
# metrics


def recognize(session: Any, images: list[np.ndarray], batch: int = REC_BATCH) -> list[str]:
    """Greedy-decoded text of each crop, batched like rapidocr (sorted by aspect ratio, ``batch`` at once)."""
    chars = charset(session)
    name = session.get_inputs()[0].name
    order = np.argsort([im.shape[1] / im.shape[0] for im in images], kind="stable")
    out = [""] * len(images)
    for s in range(0, len(images), batch):
        ids = order[s : s + batch]
        probs = session.run(None, {name: rec_batch([images[i] for i in ids])})[0]
        for i, text in zip(ids, ctc_greedy_decode(probs, chars), strict=True):
            out[i] = text
    return out


def _normalise_spaces(s: str) -> str:
    # Inter-word spaces are scored, but not how many of them: the rec model emits a space class only
    # where it sees a gap, and leading/trailing margins carry no text.
    return " ".join(s.split())


def cer(session: Any, n: int = 200, seed: int = 0) -> float:
    """Character error rate in percent of a rec session on ``n`` rendered lines (lower is better)."""
    lines = render_lines(n, seed)
    hyps = recognize(session, [im for _, im in lines])
    return char_error_rate([_normalise_spaces(t) for t, _ in lines], [_normalise_spaces(h) for h in hyps])


def score(session: Any) -> float:
    """-CER (percent) on 200 rendered lines: higher is better, for ``--eval models.ocr:score``."""
    return -cer(session)


def _box_mask(boxes: list[tuple[float, float, float, float]], shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mask[max(0, round(y0)) : max(0, round(y1)), max(0, round(x0)) : max(0, round(x1))] = True
    return mask


def det_iou(session: Any, n: int = 8, seed: int = 0, size: tuple[int, int] = (320, 320)) -> float:
    """Pixel IoU in percent of the detected text boxes with the rendered ones (higher is better).

    DB predicts shrunk text kernels; rapidocr binarises the map at 0.3 and grows each region by
    D = area * 1.6 / perimeter (unclip). We do the same on the bounding rectangle of the pixels > 0.3 in each
    line's row band (bands split the page halfway between lines, which never share rows on our pages), so
    spurious detections stretch their band's box and are penalised, and compare with the ink boxes. The
    original model stays near 77 % (unclip overshoots the ink); a rewritten one that breaks text
    localisation drops clearly.
    """
    pages = render_pages(n, seed, size)
    name = session.get_inputs()[0].name
    inter = union = 0
    for img, boxes in pages:
        prob = session.run(None, {name: det_batch([img])})[0][0, 0]
        pred = prob > DET_THRESH
        h, w = pred.shape
        # Row bands: halfway between neighbouring lines.
        tops, bottoms = boxes[:, 1], boxes[:, 3]
        cuts = [0, *((bottoms[:-1] + tops[1:]) // 2).tolist(), h]
        found = []
        for b0, b1 in itertools.pairwise(cuts):
            ys, xs = np.nonzero(pred[b0:b1])
            if len(ys) == 0:
                continue
            x0, y0, x1, y1 = xs.min(), ys.min() + b0, xs.max() + 1, ys.max() + 1 + b0
            d = (x1 - x0) * (y1 - y0) * 1.6 / (2 * ((x1 - x0) + (y1 - y0)))
            found.append((x0 - d, y0 - d, x1 + d, y1 + d))
        got = _box_mask(found, (h, w))
        truth = _box_mask([tuple(b) for b in boxes.tolist()], (h, w))
        inter += int((got & truth).sum())
        union += int((got | truth).sum())
    return 100.0 * inter / max(union, 1)


def cls_accuracy(session: Any, n: int = 100, seed: int = 0) -> float:
    """Percent of lines whose orientation (0 or 180 degrees; every other line rotated) is classified right."""
    lines = render_lines(n, seed)
    images, labels = [], []
    for i, (_, im) in enumerate(lines):
        rotate = i % 2 == 1
        images.append(np.ascontiguousarray(im[::-1, ::-1]) if rotate else im)
        labels.append(int(rotate))  # rapidocr's label_list ['0', '180']
    name = session.get_inputs()[0].name
    correct = 0
    for s in range(0, n, 32):
        probs = session.run(None, {name: cls_batch(images[s : s + 32])})[0]
        correct += int((probs.argmax(axis=1) == np.array(labels[s : s + 32])).sum())
    return 100.0 * correct / n


# ----------------------------------------------------------------------------------------------------------
# calibration files (the CLI's --calib format: .npz keyed by graph input name, samples on axis 0)


def write_calibration(path: str | Path, n: int = 32, seed: int = 0, width: int = 320) -> Path:
    """rec calibration: ``n`` rendered lines at one fixed width, key "x", float32 [n, 3, 48, width].

    Lines of 1-3 words so that most fit the width unsqueezed; seed 1000+ keeps them apart from ``cer``'s
    default lines.
    """
    lines = render_lines(n, seed + 1000, min_words=1, max_words=3)
    return _save(path, rec_batch([im for _, im in lines], width=width))


def write_rec_samples(path: str | Path, n: int = 32, seed: int = 0) -> Path:
    """rec calibration lines at their own widths (320 px and up), for `--set int8.samples=FILE`: keys
    "x/<i>", each float32 [1, 3, 48, W_i]; the same lines as ``write_calibration``'s, up to 4 words."""
    lines = render_lines(n, seed + 1000, min_words=1, max_words=4)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{f"{INPUT_NAME}/{i}": rec_batch([im]) for i, (_, im) in enumerate(lines)})
    return path


def write_det_calibration(
    path: str | Path, n: int = 4, seed: int = 0, size: tuple[int, int] = (320, 320)
) -> Path:
    """det calibration: ``n`` rendered pages, key "x", float32 [n, 3, H, W]."""
    pages = render_pages(n, seed + 1000, size)
    return _save(path, det_batch([img for img, _ in pages]))


def write_cls_calibration(path: str | Path, n: int = 32, seed: int = 0) -> Path:
    """cls calibration: ``n`` lines, every other one rotated 180 degrees; key "x", float32 [n,3,48,192]."""
    lines = render_lines(n, seed + 1000, min_words=1, max_words=3)
    images = [im if i % 2 == 0 else np.ascontiguousarray(im[::-1, ::-1]) for i, (_, im) in enumerate(lines)]
    return _save(path, cls_batch(images))


def _save(path: str | Path, x: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{INPUT_NAME: x})
    return path


def main(argv: list[str] | None = None) -> int:
    """Command line: ``fetch``, ``calib {rec,det,cls} OUT.npz``, ``eval {rec,det,cls} MODEL.onnx``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_f = sub.add_parser("fetch", help="copy the ONNX files out of rapidocr-onnxruntime")
    p_f.add_argument("--dest", type=Path, default=DATA_DIR)
    p_c = sub.add_parser("calib", help="write a calibration .npz keyed by the graph input name")
    p_c.add_argument("model", choices=[*sorted(MODEL_FILES), "rec-widths"])
    p_c.add_argument("out", type=Path)
    p_c.add_argument("--n", type=int, default=None)
    p_c.add_argument("--seed", type=int, default=0)
    p_e = sub.add_parser("eval", help="rec: CER %% (lower is better); det: IoU %%; cls: accuracy %%")
    p_e.add_argument("model", choices=sorted(MODEL_FILES))
    p_e.add_argument("path", type=Path)
    p_e.add_argument("--n", type=int, default=None)
    args = parser.parse_args(argv)

    if args.cmd == "fetch":
        for key, p in fetch(args.dest).items():
            print(f"{key}: {p}")
    elif args.cmd == "calib":
        writer = {
            "rec": write_calibration,
            "det": write_det_calibration,
            "cls": write_cls_calibration,
            "rec-widths": write_rec_samples,
        }
        kwargs = {"seed": args.seed} | ({"n": args.n} if args.n else {})
        out = writer[args.model](args.out, **kwargs)
        with np.load(out) as z:
            shapes = sorted({z[k].shape for k in z.files})
        print(f"wrote {out} ({len(z.files)} arrays, shapes {shapes[0]} to {shapes[-1]})")
    else:
        import onnxopt  # optimized models may use onnxopt's custom ops: register its library

        sess = onnxopt.make_session(str(args.path))
        kwargs = {"n": args.n} if args.n else {}
        if args.model == "rec":
            print(f"CER {cer(sess, **kwargs):.2f}%")
        elif args.model == "det":
            print(f"IoU {det_iou(sess, **kwargs):.2f}%")
        else:
            print(f"accuracy {cls_accuracy(sess, **kwargs):.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
