import pytest
import torch

from training.models.encoders import ENCODERS, build_encoder, encoder_config, encoder_name

# Tiny sizes: a 32^3 volume, so every encoder runs in well under a second on CPU.
TINY = {
    "vit": dict(patch_size=16, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2),
    "swin": dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)),
    "cnn": dict(block_inplanes=(8, 8, 16, 16)),
}
# (N, C) documented for a 32^3 input with the sizes above.
EXPECTED = {
    "vit": ((32 // 16) ** 3, 32),
    "swin": ((32 // 32) ** 3, 16 * 12),
    "cnn": ((32 // 32) ** 3, 16),
}


@pytest.mark.parametrize("name", ENCODERS)
def test_tokens_shape(name):
    torch.manual_seed(0)
    enc = build_encoder(name, img_size=32, in_channels=1, **TINY[name])
    tokens = enc(torch.randn(2, 1, 32, 32, 32))
    n, c = EXPECTED[name]
    assert tokens.shape == (2, n, c)
    assert (enc.num_tokens, enc.out_dim) == (n, c)
    assert torch.isfinite(tokens).all()


def test_vit_patch8_token_count_and_two_channels():
    enc = build_encoder("vit", img_size=32, in_channels=2, patch_size=8, hidden_size=32, mlp_dim=32, num_layers=1, num_heads=2)
    assert enc(torch.randn(1, 2, 32, 32, 32)).shape == (1, 64, 32)
    assert enc.num_tokens == 64


def test_cnn_token_count_formula_at_64():
    enc = build_encoder("cnn", img_size=64, block_inplanes=(4, 4, 4, 8))
    assert enc(torch.randn(1, 1, 64, 64, 64)).shape == (1, enc.num_tokens, 8) == (1, 8, 8)


def test_defaults_follow_unetr_and_swinunetr():
    vit = encoder_config("vit")
    assert (vit.patch_size, vit.hidden_size, vit.mlp_dim, vit.num_layers, vit.num_heads) == (16, 768, 3072, 12, 12)
    assert encoder_config("swin").feature_size == 48
    assert encoder_name(encoder_config("cnn")) == "cnn"


def test_bad_name_and_field():
    with pytest.raises(ValueError):
        build_encoder("resnet152")
    with pytest.raises(TypeError):
        build_encoder("vit", hiden_size=8)
    with pytest.raises(ValueError):
        build_encoder("swin", img_size=48, feature_size=12)
