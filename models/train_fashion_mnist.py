"""Train the VGG-style Fashion-MNIST CNN and export it to models/fashion_mnist.onnx.

Needs torch==2.13.0 (CPU), numpy and onnx, kept OUT of the project venv:

    python3 -m venv /tmp/trainvenv
    /tmp/trainvenv/bin/pip install torch==2.13.0 numpy onnx
    nice -n 10 /tmp/trainvenv/bin/python models/train_fashion_mnist.py            # from the repo root

Options: --epochs (default 9), --seed (default 0), --threads (default 2), --out, --limit-batches N (time
N batches of one epoch and exit without exporting; used to choose the epoch count).

Network (BatchNorm during training, folded into the convolutions at export):
    conv3x3 1->64 @28 - BN - ReLU - maxpool2      -> 64x14x14
    conv3x3 64->64 @14 - BN - ReLU - maxpool2     -> 64x7x7
    conv3x3 64->128 @7 - BN - ReLU
    conv3x3 128->256 @7 - BN - ReLU
    avgpool k4 s3 (== adaptive avg-pool 7->2)     -> 256x2x2 -> flatten 1024
    FC 1024->1024 - ReLU - dropout 0.25 - FC 1024->10

Training: SGD (momentum 0.9, Nesterov, weight decay 5e-4 on weights only), OneCycle LR (peak 0.1),
batch 128, label smoothing 0.1, augmentation = random crop 28 from the image zero-padded by 2 + horizontal
flip. Input preprocessing comes from models/fashion_mnist.py ((x/255 - MEAN)/STD, outside the graph).

The ONNX graph is written directly with onnx.helper from the folded weights (not torch.onnx.export), so it
contains exactly Conv, Relu, MaxPool, AveragePool, Flatten and Gemm, opset 17, input "input" float32
[batch, 1, 28, 28] with a symbolic batch dim and output "logits" [batch, 10]. The export is checked against
the torch model with onnx's reference evaluator before it is written.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F  # noqa: N812 (torch's own convention)
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # so `models` imports when the script is run by path
from models import fashion_mnist as fm  # noqa: E402

CONV_CHANNELS = ((1, 64), (64, 64), (64, 128), (128, 256))
POOL_AFTER = (True, True, False, False)  # 2x2 max-pool after the first two convs: 28 -> 14 -> 7
HIDDEN = 1024


class Net(nn.Module):
    """VGG-style CNN; see the module docstring for the layer list."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(ci, co, 3, padding=1, bias=False) for ci, co in CONV_CHANNELS)
        self.bns = nn.ModuleList(nn.BatchNorm2d(co) for _, co in CONV_CHANNELS)
        # AvgPool k4 s3 on 7x7 gives windows [0,4) and [3,7): exactly AdaptiveAvgPool2d(2) on 7x7, and a
        # plain AveragePool in ONNX.
        self.pool = nn.AvgPool2d(kernel_size=4, stride=3)
        self.fc1 = nn.Linear(256 * 2 * 2, HIDDEN)
        self.drop = nn.Dropout(0.25)
        self.fc2 = nn.Linear(HIDDEN, fm.NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn, pool in zip(self.convs, self.bns, POOL_AFTER, strict=True):
            x = F.relu(bn(conv(x)))
            if pool:
                x = F.max_pool2d(x, 2)
        x = self.pool(x).flatten(1)
        return self.fc2(self.drop(F.relu(self.fc1(x))))


def augment(raw: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop (zero-pad 2, crop 28) + h-flip of uint8 [B, 28, 28] -> normalised [B, 1, 28, 28]."""
    b = raw.shape[0]
    x = raw.float() / 255.0
    # Pad with 0 in pixel space (= background) BEFORE normalising, as a padded photo would look.
    padded = F.pad(x, (2, 2, 2, 2))
    oy = torch.randint(0, 5, (b,), generator=gen)
    ox = torch.randint(0, 5, (b,), generator=gen)
    ar = torch.arange(28)
    rows = (oy[:, None] + ar)[:, :, None]
    cols = (ox[:, None] + ar)[:, None, :]
    x = padded[torch.arange(b)[:, None, None], rows, cols]
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None], x.flip(-1), x)
    x = (x - fm.MEAN) / fm.STD
    return x[:, None]


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 1000) -> float:
    """Top-1 accuracy (percent) of the torch model on preprocessed arrays."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        logits = model(torch.from_numpy(x[i : i + batch]))
        correct += int((logits.argmax(1).numpy() == y[i : i + batch]).sum())
    return 100.0 * correct / len(x)


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[np.ndarray, np.ndarray]:
    """Conv (no bias) followed by eval-mode BN -> one conv weight and bias."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    w = conv.weight.detach() * scale[:, None, None, None]
    b = bn.bias.detach() - bn.running_mean * scale
    return w.numpy().astype(np.float32), b.numpy().astype(np.float32)


def to_onnx(model: Net, meta: dict[str, str]) -> onnx.ModelProto:
    """Build the inference graph (BN folded, dropout dropped) from the trained model."""
    model.eval()
    inits, nodes = [], []
    cur = "input"
    for i, (conv, bn, pool) in enumerate(zip(model.convs, model.bns, POOL_AFTER, strict=True), start=1):
        w, b = fold_bn(conv, bn)
        inits += [numpy_helper.from_array(w, f"conv{i}.weight"), numpy_helper.from_array(b, f"conv{i}.bias")]
        nodes.append(
            helper.make_node(
                "Conv",
                [cur, f"conv{i}.weight", f"conv{i}.bias"],
                [f"conv{i}"],
                name=f"conv{i}",
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
                strides=[1, 1],
            )
        )
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"], name=f"relu{i}"))
        cur = f"relu{i}"
        if pool:
            nodes.append(
                helper.make_node(
                    "MaxPool", [cur], [f"pool{i}"], name=f"pool{i}", kernel_shape=[2, 2], strides=[2, 2]
                )
            )
            cur = f"pool{i}"
    nodes.append(
        helper.make_node(
            "AveragePool", [cur], ["avgpool"], name="avgpool", kernel_shape=[4, 4], strides=[3, 3]
        )
    )
    nodes.append(helper.make_node("Flatten", ["avgpool"], ["flatten"], name="flatten", axis=1))
    for j, (fc, src, dst) in enumerate(((model.fc1, "flatten", "fc1"), (model.fc2, "relu_fc1", "logits")), 1):
        inits += [
            numpy_helper.from_array(fc.weight.detach().numpy().astype(np.float32), f"fc{j}.weight"),
            numpy_helper.from_array(fc.bias.detach().numpy().astype(np.float32), f"fc{j}.bias"),
        ]
        nodes.append(
            helper.make_node("Gemm", [src, f"fc{j}.weight", f"fc{j}.bias"], [dst], name=f"fc{j}", transB=1)
        )
        if j == 1:
            nodes.append(helper.make_node("Relu", ["fc1"], ["relu_fc1"], name="relu_fc1"))
    graph = helper.make_graph(
        nodes,
        "fashion_mnist_vgg",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", fm.NUM_CLASSES])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxopt-models")
    m.ir_version = 8  # opset 17's IR version; keeps the file loadable by older onnxruntime builds
    m.doc_string = "Fashion-MNIST VGG-style CNN; input = (pixel/255 - mean)/std, see models/fashion_mnist.py"
    helper.set_model_props(m, meta)
    onnx.checker.check_model(m, full_check=True)
    return m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train the Fashion-MNIST CNN and export ONNX.")
    ap.add_argument("--epochs", type=int, default=9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--out", type=Path, default=REPO / "models" / "fashion_mnist.onnx")
    ap.add_argument("--limit-batches", type=int, default=0, help="time this many batches and exit")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(args.seed)

    train_raw, train_y = fm.load_raw("train")
    test_x, test_y = fm.load_test()
    train_raw_t = torch.from_numpy(train_raw)
    train_y_t = torch.from_numpy(train_y)

    model = Net()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]  # no weight decay on BN/bias
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        momentum=0.9,
        nesterov=True,
    )
    steps_per_epoch = len(train_raw) // args.batch  # drop the ragged last batch (BN on tiny batches)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch, pct_start=0.25
    )

    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(train_raw), generator=gen)
        loss_sum, correct, seen = 0.0, 0, 0
        te = time.perf_counter()
        for step in range(steps_per_epoch):
            idx = perm[step * args.batch : (step + 1) * args.batch]
            x = augment(train_raw_t[idx], gen)
            y = train_y_t[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            if args.limit_batches and step + 1 >= args.limit_batches:
                dt = time.perf_counter() - te
                # The loss doubles as a reproducibility check: two runs must print the same digits.
                print(
                    f"{step + 1} batches in {dt:.1f}s -> one epoch ~ "
                    f"{dt / (step + 1) * steps_per_epoch:.0f}s; mean loss {loss_sum / seen:.8f}"
                )
                return 0
        print(
            f"epoch {epoch + 1}/{args.epochs}: loss {loss_sum / seen:.4f} "
            f"train-acc {100 * correct / seen:.2f}% "
            f"({time.perf_counter() - te:.0f}s)",
            flush=True,
        )
    train_s = time.perf_counter() - t0
    acc = evaluate(model, test_x, test_y)
    print(f"training {train_s:.0f}s, test top-1 (torch) {acc:.2f}%")

    meta = {
        "preprocess": f"x = (pixel/255 - {fm.MEAN}) / {fm.STD}, NCHW float32 [batch,1,28,28]",
        "classes": ",".join(fm.CLASSES),
        "seed": str(args.seed),
        "epochs": str(args.epochs),
        "test_top1_torch": f"{acc:.2f}",
        "trainer": "models/train_fashion_mnist.py, torch " + torch.__version__,
    }
    m = to_onnx(model, meta)
    # The export must reproduce the torch model (BN folding, pooling, flatten order, Gemm transB).
    with torch.no_grad():
        ref = model(torch.from_numpy(test_x[:32])).numpy()
    got = ReferenceEvaluator(m).run(None, {"input": test_x[:32]})[0]
    err = float(np.abs(got - ref).max())
    print(f"ONNX vs torch max abs diff on 32 test samples: {err:.2e}")
    if err > 1e-3:
        raise RuntimeError(f"exported graph disagrees with torch (max abs diff {err})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
