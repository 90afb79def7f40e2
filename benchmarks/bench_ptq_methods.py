"""Post-training methods on real MNIST: nearest (min/max, MSE), AdaRound, AdaRound with CLE and
bias correction, GPTQ; test accuracy, top-1 agreement with the float model, seconds.

    python benchmarks/bench_ptq_methods.py --threads 2 --networks mnist_cnn resnet18 mobilenetv2

Each network is trained once (``--train-images`` of the MNIST training split, one epoch, Adam
1e-3, batch 64, seed 0) and its float weights cached in ``benchmarks/.cache/``. NNI's MNIST CNN
reads the 28x28 images as they are; ResNet-18 and MobileNetV2 (``_networks.py``) read them
padded to 32x32 and repeated over 3 channels. Every quantized model is W<b>A8: Conv2d/Linear
weights at b bits (per tensor: ``per_tensor_affine`` uint; per channel:
``per_channel_symmetric`` int), the input of every Conv2d/Linear at 8 bits (per tensor, min/max
observer; ``--ends-bits 8`` keeps the first and last layer's weights at 8 bits, as the low-bit
papers do), calibrated on ``--calibration-batches`` batches of 32 training images (the learned
rounding and the bias correction are fitted on those). AdaRound and GPTQ round on the MSE
observer's grid, so against "nearest+mse" they differ in rounding only; "-qin" fits them on
the quantized model's inputs (``fit_inputs: quantized``). Seconds are wall-clock
for compress + calibrate (+ fit), with ``--threads`` torch threads. ``--finetune`` instead
compares a QAT fine-tune that starts from the float weights with one that starts from the
AdaRound (or GPTQ) weights.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from quantsearch.quantization import PtqQuantizer, QAT_Quantizer, wrappers_of
from quantsearch.tasks import MnistCNN, read_idx

try:
    from _networks import MobileNetV2, ResNet18
except ImportError:  # run as a module: python -m benchmarks.bench_ptq_methods
    from benchmarks._networks import MobileNetV2, ResNet18

CACHE = Path(__file__).parent / ".cache"
NETWORKS = {"mnist_cnn": MnistCNN, "resnet18": ResNet18, "mobilenetv2": MobileNetV2}
METHODS = ("nearest-minmax", "nearest-mse", "adaround", "adaround-cle-bc", "gptq",
           "adaround-qin", "gptq-qin")
SCHEMES = {"per_tensor": ("per_tensor_affine", "uint"), "per_channel": ("per_channel_symmetric",
                                                                         "int")}


def load_mnist(data_dir: Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    def images(name: str) -> Tensor:
        raw = torch.from_numpy(read_idx(data_dir / name).astype(np.float32) / 255.0)
        return ((raw - 0.1307) / 0.3081).unsqueeze(1)

    def labels(name: str) -> Tensor:
        return torch.from_numpy(read_idx(data_dir / name).astype(np.int64))

    return (images("train-images.idx3-ubyte.gz"), labels("train-labels.idx1-ubyte.gz"),
            images("t10k-images.idx3-ubyte.gz"), labels("t10k-labels.idx1-ubyte.gz"))


def shaped(network: str, x: Tensor) -> Tensor:
    """28x28 for the MNIST CNN; 32x32 over 3 channels for ResNet-18 and MobileNetV2."""
    if network == "mnist_cnn":
        return x
    return nn.functional.pad(x, (2, 2, 2, 2), value=float(x.min())).expand(-1, 3, -1, -1)


def trained(network: str, train_x: Tensor, train_y: Tensor, count: int) -> nn.Module:
    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"ptq-methods-{network}-{count}.pt"
    torch.manual_seed(0)
    model = NETWORKS[network]()
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval()
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))[:count]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    start = time.perf_counter()
    for first in range(0, count, 64):
        pick = order[first : first + 64]
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(shaped(network, train_x[pick])), train_y[pick])
        loss.backward()
        optimizer.step()
    print(f"{network}: trained on {count} images in {time.perf_counter() - start:.0f} s")
    torch.save(model.state_dict(), path)
    return model.eval()


@torch.no_grad()
def predictions(model: nn.Module, network: str, x: Tensor) -> Tensor:
    model.eval()
    return torch.cat([model(shaped(network, x[i : i + 500])).argmax(1)
                      for i in range(0, len(x), 500)])


def config_list(method: str, bits: int, scheme: str, iters: int,
                ends: list[str] | None = None, ends_bits: int = 8) -> list[dict[str, Any]]:
    """One entry for every Conv2d/Linear; with ``ends`` (the first and last layer's names), a
    second entry that keeps those at ``ends_bits``, as the low-bit papers do."""
    quant_scheme, dtype = SCHEMES[scheme]
    entry: dict[str, Any] = {
        "quant_types": ["weight", "input"], "quant_bits": {"weight": bits, "input": 8},
        "op_types": ["Conv2d", "Linear"], "quant_scheme": quant_scheme, "quant_dtype": dtype,
        "observer": {"weight": "minmax" if method == "nearest-minmax" else "mse",
                     "input": "minmax"},
    }
    if method.startswith("adaround"):
        entry.update(rounding="adaround", adaround_iters=iters)
    if method == "adaround-cle-bc":
        entry.update(equalize=True, bias_correction=True)
    if method.startswith("gptq"):
        entry["rounding"] = "gptq"
    if method.endswith("-qin"):  # fitted on the quantized model's inputs
        entry["fit_inputs"] = "quantized"
    if not ends:
        return [entry]
    kept = {key: value for key, value in entry.items() if key != "op_types"}
    kept.update(op_names=ends, quant_bits={"weight": ends_bits, "input": 8})
    return [entry, kept]  # the last matching entry wins


def end_layers(model: nn.Module) -> list[str]:
    """The first and the last Conv2d/Linear in the model's module order."""
    names = [name for name, module in model.named_modules()
             if isinstance(module, (nn.Conv2d, nn.Linear))]
    return [names[0], names[-1]]


def quantize(float_model: nn.Module, config: list[dict[str, Any]], calibration: list[Tensor]
             ) -> tuple[nn.Module, PtqQuantizer, float]:
    model = NETWORKS_OF[id(float_model)]()
    model.load_state_dict(float_model.state_dict())
    model.eval()
    start = time.perf_counter()
    quantizer = PtqQuantizer(model, config, dummy_input=calibration[0][:1])
    quantizer.compress()
    with quantizer.calibrate():
        for batch in calibration:
            model(batch)
    return model.eval(), quantizer, time.perf_counter() - start


NETWORKS_OF: dict[int, Any] = {}


def run_ptq(args: argparse.Namespace, data: tuple[Tensor, ...]) -> list[dict[str, Any]]:
    train_x, train_y, test_x, test_y = data
    test_x, test_y = test_x[: args.test_images], test_y[: args.test_images]
    rows: list[dict[str, Any]] = []
    for network in args.networks:
        count = args.train_images.get(network, 60000)
        model = trained(network, train_x, train_y, count)
        NETWORKS_OF[id(model)] = NETWORKS[network]
        reference = predictions(model, network, test_x)
        float_acc = float((reference == test_y).float().mean())
        print(f"{network}: float test accuracy {float_acc:.4f} on {len(test_x)} test images",
              flush=True)
        pick = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(1))
        calibration = [shaped(network, train_x[pick[i * 32 : (i + 1) * 32]])
                       for i in range(args.calibration_batches)]
        for scheme in args.schemes:
            for bits in args.bits:
                for method in args.methods:
                    ends = end_layers(model) if args.ends_bits else None
                    config = config_list(method, bits, scheme, args.adaround_iters, ends,
                                         args.ends_bits or 8)
                    quantized, _, seconds = quantize(model, config, calibration)
                    got = predictions(quantized, network, test_x)
                    row = {
                        "network": network, "scheme": scheme, "bits": bits, "method": method,
                        "ends_bits": args.ends_bits, "float_accuracy": float_acc,
                        "accuracy": float((got == test_y).float().mean()),
                        "agreement": float((got == reference).float().mean()),
                        "seconds": seconds,
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def run_finetune(args: argparse.Namespace, data: tuple[Tensor, ...]) -> None:
    """QAT (weights at --bits, per tensor) fine-tuned --finetune-steps steps from the float
    weights, or from the weights AdaRound/GPTQ rounded (the latent weights set to them)."""
    train_x, train_y, test_x, test_y = data
    network = "mnist_cnn"
    model = trained(network, train_x, train_y, args.train_images.get(network, 60000))
    NETWORKS_OF[id(model)] = NETWORKS[network]
    pick = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(1))
    calibration = [train_x[pick[i * 32 : (i + 1) * 32]] for i in range(args.calibration_batches)]
    for bits in args.bits:
        for start_from in ("float", "adaround", "gptq"):
            start = NETWORKS[network]()
            start.load_state_dict(model.state_dict())
            if start_from != "float":
                config = [{"quant_types": ["weight"], "quant_bits": bits,
                           "op_types": ["Conv2d", "Linear"], "observer": "minmax",
                           "rounding": start_from, "adaround_iters": args.adaround_iters}]
                quantized, _, _ = quantize(model, config, calibration)
                with torch.no_grad():
                    for name, wrapper in wrappers_of(quantized).items():
                        start.get_submodule(name).weight.copy_(wrapper.quantized_weight())
                        start.get_submodule(name).bias.copy_(wrapper.module.bias)
            torch.manual_seed(0)
            optimizer = torch.optim.SGD(start.parameters(), lr=0.01, momentum=0.9)
            qat = QAT_Quantizer(start, [{"quant_types": ["weight"], "quant_bits": bits,
                                         "op_types": ["Conv2d", "Linear"]}], optimizer)
            qat_model = qat.compress()
            accuracies = []
            order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(2))
            for step in range(args.finetune_steps + 1):
                if step in (0, args.finetune_steps // 4, args.finetune_steps):
                    got = predictions(qat_model, network, test_x[: args.test_images])
                    accuracies.append(float((got == test_y[: args.test_images]).float().mean()))
                    qat_model.train()
                if step == args.finetune_steps:
                    break
                batch = order[step * 64 : (step + 1) * 64]
                optimizer.zero_grad()
                nn.functional.cross_entropy(qat_model(train_x[batch]), train_y[batch]).backward()
                optimizer.step()
            print(json.dumps({"bits": bits, "start": start_from, "steps": [
                0, args.finetune_steps // 4, args.finetune_steps], "accuracy": accuracies}),
                flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("/work/shared/data/mnist"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 4, 3, 2])
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    parser.add_argument("--train-images", nargs="+", default=["mnist_cnn=60000",
                        "resnet18=6400", "mobilenetv2=6400"],
                        help="network=count: training images for the one float epoch")
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--adaround-iters", type=int, default=500)
    parser.add_argument("--ends-bits", type=int, default=0,
                        help="keep the first and last layer at these weight bits (0: no)")
    parser.add_argument("--finetune", action="store_true")
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.train_images = {k: int(v) for k, v in (item.split("=") for item in args.train_images)}
    torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}", flush=True)
    data = load_mnist(args.data_dir)
    if args.finetune:
        run_finetune(args, data)
        return
    rows = run_ptq(args, data)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
