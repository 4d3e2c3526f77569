"""PyTorch → ONNX: one self-contained file, dynamic batch, BatchNorm folded, nodes named by module."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from torch import nn

from autorank.engine.deploy import onnx_session, to_onnx


def _chain_model() -> nn.Module:
    """Plain Conv/BN/ReLU chains, a decomposed-style nested chain and a Linear head."""
    model = nn.Sequential()
    model.add_module("stem", nn.Conv2d(3, 8, 3, padding=1, bias=False))
    model.add_module("bn", nn.BatchNorm2d(8))
    model.add_module("relu", nn.ReLU())
    model.add_module("block", nn.Sequential(nn.Conv2d(8, 4, 1, bias=False), nn.Conv2d(4, 4, 3, padding=1, bias=False),
                                            nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()))
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("head", nn.Linear(8, 5))
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that folding them matters
        for bn in (model.bn, model.block[3]):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
    return model.eval()


def test_single_file_dynamic_batch_and_module_names(tmp_path):
    model = _chain_model()
    path = tmp_path / "chain.onnx"
    mapping = to_onnx(model, (3, 12, 12), path)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["chain.onnx"]  # no external-data sidecar
    proto = onnx.load_model(path)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    ops = [n.op_type for n in proto.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 4
    assert mapping == {"stem": ["stem"], "block.0": ["block.0"], "block.1": ["block.1"],
                       "block.2": ["block.2"], "head": ["head"]}
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis

    session = onnx_session(path, threads=1)
    for batch in (1, 7):
        x = torch.randn(batch, 3, 12, 12)
        got = session.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            want = model(x).numpy()
        assert got.shape == (batch, 5)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_module_names_through_attributes(tmp_path):
    """Modules held as attributes (not containers) still give dotted paths, e.g. `layer.conv`."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(x)) + x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Sequential(Block(), Block())
            self.fc = nn.Linear(2, 3)

        def forward(self, x):
            return self.fc(self.layer(x).mean((2, 3)))

    mapping = to_onnx(Net().eval(), (2, 6, 6), tmp_path / "net.onnx")
    assert set(mapping) == {"layer.0.conv", "layer.1.conv", "fc"}

