"""LibTorch C++ programs using torch_mha, built with CMake and run without Python.

The library is built from csrc/ with the top-level CMakeLists.txt and installed as a CMake package;
tests/cpp is then built against it with find_package(TorchMHA). Python writes the models and the
reference tensors; the programs compare and exit with the number of failed checks.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from torch import Tensor, nn

import torch_mha

REPO = Path(__file__).resolve().parent.parent
# Persistent so that reruns are incremental; build/ is ignored by git.
BUILD = REPO / "build" / "cmake-tests"

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")


def run(command: List[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited with {result.returncode}\n"
            f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
        )
    return result


def cmake_build(source: Path, build: Path, prefix_path: List[Path], install: Path = None) -> None:
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    run(
        ["cmake", "-S", str(source), "-B", str(build), *generator,
         "-DCMAKE_BUILD_TYPE=Release",
         "-DCMAKE_PREFIX_PATH=" + ";".join(str(p) for p in prefix_path)]
    )  # fmt: skip
    jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
    run(["cmake", "--build", str(build), "--parallel", jobs])
    if install is not None:
        run(["cmake", "--install", str(build), "--prefix", str(install)])


@pytest.fixture(scope="module")
def programs() -> Dict[str, Path]:
    """Builds and installs libtorch_mha, then builds the test programs against the package."""
    torch_prefix = Path(torch.utils.cmake_prefix_path)
    install = BUILD / "install"
    cmake_build(REPO, BUILD / "library", [torch_prefix], install=install)
    cmake_build(REPO / "tests" / "cpp", BUILD / "programs", [torch_prefix, install])
    names = ("test_jit_load", "test_api", "test_sanitize")
    return {name: BUILD / "programs" / name for name in names}


class TensorFile(nn.Module):
    """Tensors as buffers of a scripted module: what the C++ programs read (tests/cpp/check.h)."""

    def __init__(self, tensors: Dict[str, Tensor]) -> None:
        super().__init__()
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor.detach().clone())

    def save(self, path: Path) -> None:
        torch.jit.script(self).save(str(path))


class EncoderModel(nn.Module):
    """Two Transformer encoder layers whose self-attention is torch_mha's."""

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            embed_dim, num_heads, dim_feedforward=2 * embed_dim, dropout=0.0, batch_first=True,
            dtype=torch.float64,
        )  # fmt: skip
        attention = torch_mha.MultiheadAttention(
            embed_dim, num_heads, batch_first=True, dtype=torch.float64
        )
        attention.load_state_dict(layer.self_attn.state_dict())
        layer.self_attn = attention
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    def forward(self, x: Tensor, key_padding_mask: Tensor, attn_mask: Tensor) -> Tensor:
        return self.encoder(x, mask=attn_mask, src_key_padding_mask=key_padding_mask)


def run_program(program: Path, *args: Path) -> str:
    result = subprocess.run([str(program), *map(str, args)], capture_output=True, text=True)
    report = result.stdout + result.stderr
    assert result.returncode == 0, f"{program.name} exited with {result.returncode}:\n{report}"
    assert "0 failure(s)" in result.stdout, report
    return report


def test_scripted_model_forward_backward_and_step_in_cpp(
    programs: Dict[str, Path], tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = EncoderModel(embed_dim=32, num_heads=4)
    batch, length = 3, 9
    x = torch.randn(batch, length, 32, dtype=torch.float64, requires_grad=True)
    key_padding_mask = torch.zeros(batch, length, dtype=torch.bool)
    key_padding_mask[0, -3:] = True
    attn_mask = torch.ones(length, length, dtype=torch.bool).triu(1)  # causal
    grad_output = torch.randn(batch, length, 32, dtype=torch.float64)
    lr = 0.1

    scripted = torch.jit.script(model)
    scripted.save(str(tmp_path / "model.pt"))

    # The reference: the same model in eager Python.
    output = model(x, key_padding_mask, attn_mask)
    output.backward(grad_output)
    tensors = {
        "input": x,
        "key_padding_mask": key_padding_mask,
        "attn_mask": attn_mask,
        "grad_output": grad_output,
        "output": output,
        "grad_input": x.grad,
        "lr": torch.tensor(lr, dtype=torch.float64),
    }
    parameters = list(model.named_parameters())
    for name, parameter in parameters:
        key = name.replace(".", "_")
        tensors["grad_" + key] = parameter.grad
        tensors["step_" + key] = parameter.detach() - lr * parameter.grad
    tensors["num_parameters"] = torch.tensor(len(parameters))
    TensorFile(tensors).save(tmp_path / "data.pt")

    report = run_program(programs["test_jit_load"], tmp_path / "model.pt", tmp_path / "data.pt")
    assert "grad encoder.layers.1.self_attn.in_proj_weight" in report


def test_cpp_api_with_autograd(programs: Dict[str, Path], tmp_path: Path) -> None:
    torch.manual_seed(1)
    embed_dim, num_heads, batch, target_len, source_len = 24, 3, 2, 7, 11
    reference = nn.MultiheadAttention(embed_dim, num_heads, dtype=torch.float64)
    query = torch.randn(target_len, batch, embed_dim, dtype=torch.float64, requires_grad=True)
    key = torch.randn(source_len, batch, embed_dim, dtype=torch.float64, requires_grad=True)
    value = torch.randn(source_len, batch, embed_dim, dtype=torch.float64, requires_grad=True)
    key_padding_mask = torch.zeros(batch, source_len, dtype=torch.bool)
    key_padding_mask[1, -4:] = True
    attn_mask = torch.rand(target_len, source_len) > 0.8
    attn_mask[:, 0] = False
    output, weights = reference(
        query, key, value, key_padding_mask=key_padding_mask, attn_mask=attn_mask
    )
    grad_output, grad_weights = torch.randn_like(output), torch.randn_like(weights)
    torch.autograd.backward([output, weights], [grad_output, grad_weights])
    tensors = {
        "query": query,
        "key": key,
        "value": value,
        "key_padding_mask": key_padding_mask,
        "attn_mask": attn_mask,
        "num_heads": torch.tensor(num_heads),
        "output": output,
        "weights": weights,
        "grad_output": grad_output,
        "grad_weights": grad_weights,
        "grad_query": query.grad,
        "grad_key": key.grad,
        "grad_value": value.grad,
    }
    for name in ("in_proj_weight", "in_proj_bias"):
        tensors[name] = getattr(reference, name)
        tensors["grad_" + name] = getattr(reference, name).grad
    tensors["out_proj_weight"] = reference.out_proj.weight
    tensors["out_proj_bias"] = reference.out_proj.bias
    tensors["grad_out_proj_weight"] = reference.out_proj.weight.grad
    tensors["grad_out_proj_bias"] = reference.out_proj.bias.grad
    TensorFile(tensors).save(tmp_path / "data.pt")

    report = run_program(programs["test_api"], tmp_path / "data.pt")
    assert "4 C++ threads give the serial result bitwise" in report


@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_kernels_on_odd_sizes_against_aten_in_cpp(programs: Dict[str, Path], isa: str) -> None:
    """tests/cpp/test_sanitize.cpp without the sanitizers (scripts/sanitize.sh runs it with
    them): every kernel build on odd sizes, masks, layouts and dtypes against plain ATen."""
    capability = torch.backends.cpu.get_cpu_capability()
    supported = {"AVX512": {"default", "avx2", "avx512"}, "AVX2": {"default", "avx2"}}
    if isa not in supported.get(capability, {"default"}):
        pytest.skip(f"this CPU runs {capability}, not {isa}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=isa)
    result = subprocess.run(
        [str(programs["test_sanitize"])], capture_output=True, text=True, env=env
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, f"test_sanitize exited with {result.returncode}:\n{report}"
    assert "0 failure(s)" in result.stdout, report


def test_installed_package_layout(programs: Dict[str, Path]) -> None:
    install = BUILD / "install"
    assert (install / "include" / "torch_mha" / "torch_mha.h").is_file()
    assert (install / "lib" / "cmake" / "TorchMHA" / "TorchMHAConfig.cmake").is_file()
    libraries = list((install / "lib").glob("libtorch_mha.so*"))
    assert libraries, "libtorch_mha.so was not installed"
    # The LibTorch library has no Python dependency.
    if shutil.which("readelf"):
        dynamic = run(["readelf", "-d", str(libraries[0])]).stdout.splitlines()
        needed = [line for line in dynamic if "(NEEDED)" in line]
        assert needed and not any("python" in line.lower() for line in needed), needed


def test_loading_the_model_without_torch_mha_fails_clearly(
    programs: Dict[str, Path], tmp_path: Path
) -> None:
    """A Python process that did not import torch_mha cannot run a model using its ops."""
    model = torch.jit.script(torch_mha.MultiheadAttention(8, 2))
    model.save(str(tmp_path / "model.pt"))
    code = f"import torch; torch.jit.load({str(tmp_path / 'model.pt')!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert "Unknown builtin op: torch_mha::multi_head_attention" in result.stderr
