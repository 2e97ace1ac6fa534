import json

import pytest
import torch
from monai.networks.nets import UNETR, ResNet, SwinUNETR, ViT

from training.models.encoders import build_encoder
from training.pretrain.export import export_encoder, load_into_monai


def _export_and_reload(enc, name, tmp_path):
    with torch.no_grad():  # make the weights differ from any fresh init
        for p in enc.parameters():
            p.add_(0.01 * torch.randn_like(p))
    weights, meta_path = export_encoder(enc, name, enc.config, tmp_path)
    state = torch.load(weights, weights_only=True)
    assert set(state) == set(enc.monai_module.state_dict())
    return load_into_monai(meta_path), json.loads(meta_path.read_text())


def test_vit_loads_into_unetr(tmp_path):
    torch.manual_seed(0)
    # UNETR fixes patch 16 and 12 layers; keep the width tiny instead.
    enc = build_encoder("vit", img_size=32, hidden_size=32, mlp_dim=32, num_heads=2).eval()
    net, meta = _export_and_reload(enc, "vit", tmp_path)
    assert isinstance(net, UNETR) and meta["attribute"] == "vit"
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.vit(x)[0], enc(x))
    assert "net.vit.load_state_dict(state, strict=True)" in meta["snippet"]


def test_vit_other_depth_loads_into_plain_vit(tmp_path):
    enc = build_encoder("vit", img_size=32, patch_size=8, hidden_size=32, mlp_dim=32, num_layers=1, num_heads=2).eval()
    net, meta = _export_and_reload(enc, "vit", tmp_path)
    assert isinstance(net, ViT) and meta["attribute"] is None
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x)[0], enc(x))


def test_swin_loads_into_swinunetr(tmp_path):
    torch.manual_seed(0)
    enc = build_encoder("swin", img_size=32, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)).eval()
    net, meta = _export_and_reload(enc, "swin", tmp_path)
    assert isinstance(net, SwinUNETR) and meta["attribute"] == "swinViT"
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        last = net.swinViT(x, net.normalize)[-1]
        torch.testing.assert_close(last.flatten(2).transpose(1, 2), enc(x))


def test_cnn_loads_into_resnet(tmp_path):
    torch.manual_seed(0)
    enc = build_encoder("cnn", img_size=32, block_inplanes=(4, 4, 8, 8)).eval()
    net, _ = _export_and_reload(enc, "cnn", tmp_path)
    assert isinstance(net, ResNet)
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():  # ResNet's own forward average-pools the same last feature map
        torch.testing.assert_close(net.eval()(x), enc(x).mean(dim=1))


def test_load_refuses_non_monai_class(tmp_path):
    enc = build_encoder("cnn", img_size=32, block_inplanes=(4, 4, 4, 4))
    _, meta_path = export_encoder(enc, "cnn", enc.config, tmp_path)
    meta = json.loads(meta_path.read_text())
    meta["monai_class"] = "os.system"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError):
        load_into_monai(meta_path)


def test_export_records_the_collapse_probe(tmp_path):
    enc = build_encoder("cnn", img_size=32, block_inplanes=(4, 4, 4, 4))
    probe = {"between_volume_share": 0.3, "between_volume_share_init": 0.5, "collapsed": False}
    _, meta_path = export_encoder(enc, "cnn", enc.config, tmp_path, probe=probe)
    assert json.loads(meta_path.read_text())["probe"] == probe
    _, meta_path = export_encoder(enc, "cnn", enc.config, tmp_path / "plain")
    assert json.loads(meta_path.read_text())["probe"] is None
