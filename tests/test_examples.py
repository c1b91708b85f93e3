"""Runs every script in examples/ end to end with tiny settings, in subprocesses, and checks
what it printed and wrote."""

import importlib.util
import json
import math
import os
import re
import socket
import subprocess
import sys
import warnings
from typing import Dict, List, Optional

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
TIMEOUT_S = 240


def run_example(args: List[str], env: Optional[Dict[str, str]] = None) -> str:
    result = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def numbers_after(label: str, text: str) -> List[float]:
    return [float(m) for m in re.findall(re.escape(label) + r"\s*([-+0-9.e]+)", text)]


def test_train_lm_demo(tmp_path: str) -> None:
    out = os.path.join(tmp_path, "out")
    stdout = run_example(
        [
            "examples/train_lm.py",
            "--steps=8",
            "--d-model=32",
            "--heads=2",
            "--layers=1",
            "--length=32",
            "--batch=8",
            "--threads=1",
            "--sample-chars=40",
            f"--out={out}",
        ]
    )
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["steps"] == 8
    for name in ("nn", "torch_mha"):
        result = metrics["results"][name]
        curve = metrics["curves"][name]
        assert len(curve["train"]) == 8
        values = curve["train"] + curve["val"] + list(result.values())
        assert all(math.isfinite(v) for v in values), name
        assert result["final_val_loss"] < result["initial_val_loss"] - 0.05, name
        assert curve["train"][-1] < curve["train"][0] - 0.05, name
        assert result["peak_step_memory_bytes"] > 0 and result["tokens_per_s"] > 0
    # Dropout 0, same initial weights and batches: the two runs track each other closely.
    nn_curve, ours_curve = metrics["curves"]["nn"]["train"], metrics["curves"]["torch_mha"]["train"]
    assert max(abs(a - b) for a, b in zip(nn_curve, ours_curve)) < 1e-3
    assert metrics["speedup"] > 0

    with open(metrics["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    files = {"vocab.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load is deprecated
        loaded = torch.jit.load(metrics["torchscript"], _extra_files=files)
    symbols = json.loads(files["vocab.json"])
    assert "torch_mha::multi_head_attention" in str(loaded.inlined_graph)
    with torch.no_grad():
        logits = loaded(torch.randint(0, len(symbols), (2, 16)))
    assert logits.shape == (2, 16, len(symbols)) and torch.isfinite(logits).all()

    sample = metrics["sample"]
    assert sample.startswith("def ") and len(sample) == len("def ") + 40
    assert sample in stdout
    for text in ("speed-up (tokens/s, torch_mha / nn):", "peak memory of a training step"):
        assert text in stdout
    assert "replaced 1 torch.nn.MultiheadAttention module" in stdout


def test_swap_into_model_example() -> None:
    stdout = run_example(["examples/swap_into_model.py"])
    assert "replaced 7 torch.nn.MultiheadAttention modules" in stdout
    (output_diff,) = numbers_after("output", stdout)
    (grad_diff,) = numbers_after("gradients", stdout)
    assert output_diff < 1e-5 and grad_diff < 1e-4
    assert "restore_attention: 7 module(s) back to torch.nn.MultiheadAttention" in stdout
    assert "restored model equals the nn model with the trained weights: True" in stdout


def test_export_example(tmp_path: str) -> None:
    stdout = run_example(["examples/export.py", f"--out={tmp_path}"])
    lines = stdout.strip().splitlines()
    assert len(lines) == 2
    for line, suffix in zip(lines, ("char_lm.torchscript.pt", "char_lm.pt2")):
        path = os.path.join(tmp_path, suffix)
        assert path in line and os.path.getsize(path) > 0
        assert ": 2 torch_mha nodes" in line
        (diff,) = numbers_after("max |loaded - eager|", line)
        assert diff < 1e-5
    program = torch.export.load(os.path.join(tmp_path, "char_lm.pt2"))
    assert any("torch_mha" in str(node.target) for node in program.graph.nodes)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_train_ddp_example_with_torchrun() -> None:
    env = {"GLOO_SOCKET_IFNAME": "lo"} if os.path.isdir("/sys/class/net/lo") else {}
    stdout = run_example(
        [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            "examples/train_ddp.py",
            "--steps=4",
            "--d-model=32",
            "--layers=1",
            "--length=32",
        ],
        env=env,
    )
    assert "2 ranks, backend gloo, device cpu" in stdout
    losses = numbers_after("loss", stdout)
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert "parameters identical on all ranks: True" in stdout


@pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None,
    reason="transformers is not installed (examples/generate_hf.py needs it)",
)
def test_generate_hf_demo(tmp_path: str) -> None:
    path = os.path.join(tmp_path, "figures.json")
    stdout = run_example(["examples/generate_hf.py", "--short", "--threads=1", f"--json={path}"])
    with open(path) as f:
        figures = json.load(f)
    steps = figures["args"]["steps"]
    losses = figures["losses"]
    for name in ("sdpa", "torch_mha"):
        assert len(losses[name]) == steps and all(math.isfinite(v) for v in losses[name])
        # A few steps of AdamW on the corpus: the loss falls from about log(vocab).
        assert losses[name][-1] < losses[name][0] - 0.3, name
        assert figures["train_tokens_per_s"][name] > 0
        assert figures["generate_tokens_per_s"][name] > 0
    # Same weights, same batches, float32, no dropout: the same function up to rounding.
    assert max(abs(a - b) for a, b in zip(losses["sdpa"], losses["torch_mha"])) < 1e-3
    assert figures["losses_agree"] is True and figures["steps_within_1e-5"] == steps
    tokens = figures["generated_tokens"]
    assert len(tokens["sdpa"][0]) == figures["args"]["new_tokens"]
    assert tokens["torch_mha"] == tokens["sdpa"] and figures["greedy_tokens_identical"] is True
    # What the run printed is what it wrote.
    (train_speedup,) = numbers_after("training speed-up (tokens/s, torch_mha / sdpa):", stdout)
    (gen_speedup,) = numbers_after("generation speed-up (tokens/s, torch_mha / sdpa):", stdout)
    assert train_speedup > 0 and gen_speedup > 0
    assert abs(train_speedup - figures["train_speedup"]) < 0.01
    assert abs(gen_speedup - figures["generate_speedup"]) < 0.01
    (loss_diff,) = numbers_after(f"max |sdpa - torch_mha| over {steps} steps", stdout)
    assert loss_diff < 1e-3
    assert "greedy tokens identical: True" in stdout
