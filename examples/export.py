"""Export a model that uses torch_mha: TorchScript and torch.export, saved, loaded and checked.

    python examples/export.py                 # writes to examples/out/
    python examples/export.py --out /tmp/x

The model is the character LM of examples/train_lm.py (nn.TransformerEncoder with its attention
swapped for torch_mha). Both formats keep torch_mha's op as a node of the saved program, so the
process that loads them must `import torch_mha` first (in C++: link libtorch_mha, see README).
"""

import argparse
import os
import warnings

import torch
from train_lm import HERE, CharLM

import torch_mha


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(HERE, "out"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    torch.manual_seed(0)
    model = CharLM(vocab=100, d_model=64, heads=4, layers=2, context=64, dropout=0.0)
    torch_mha.swap_attention(model)
    model.eval()
    tokens = torch.randint(0, 100, (2, 48))
    # The export sees `tokens`; the loaded programs also get another batch size and length.
    inputs = [tokens, torch.randint(0, 100, (3, 17))]
    with torch.no_grad():
        expected = [model(x) for x in inputs]

    # TorchScript: script, save, load (deprecated upstream, still the way into C++ programs).
    path = os.path.join(args.out, "char_lm.torchscript.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript deprecation, nn.TransformerEncoder notes
        torch.jit.save(torch.jit.script(model), path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated upstream
        loaded = torch.jit.load(path)
    nodes = str(loaded.inlined_graph).count("torch_mha::multi_head_attention")
    with torch.no_grad():
        diff = max((loaded(x) - y).abs().max().item() for x, y in zip(inputs, expected))
    print(f"TorchScript  {path}: {nodes} torch_mha nodes, max |loaded - eager| {diff:.1e}")

    # torch.export with dynamic batch size and sequence length, saved as a .pt2 archive.
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("length", min=2, max=64)}
    program = torch.export.export(model, (tokens,), dynamic_shapes={"tokens": dims})
    path = os.path.join(args.out, "char_lm.pt2")
    torch.export.save(program, path)
    reloaded = torch.export.load(path).module()
    nodes = sum("torch_mha" in str(node.target) for node in program.graph.nodes)
    with torch.no_grad():
        diff = max((reloaded(x) - y).abs().max().item() for x, y in zip(inputs, expected))
    print(f"torch.export {path}: {nodes} torch_mha nodes, max |loaded - eager| {diff:.1e}")


if __name__ == "__main__":
    main()
