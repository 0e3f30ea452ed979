import torch

from wurst.models.common import AttnBlock, timestep_embedding


def test_timestep_embedding_is_sin_then_cos_of_scaled_time():
    emb = timestep_embedding(torch.tensor([0.0, 0.5]), 8)
    assert emb.shape == (2, 8)
    assert torch.allclose(emb[0, :4], torch.zeros(4)) and torch.allclose(emb[0, 4:], torch.ones(4))
    # first frequency is 1: sin(0.5 * 10000)
    assert torch.isclose(emb[1, 0], torch.sin(torch.tensor(5000.0)), atol=1e-4)


def test_attention_block_keeps_shape_and_mixes_conditioning():
    block = AttnBlock(32, 24, nhead=4).eval()
    x, kv = torch.randn(2, 32, 5, 6), torch.randn(2, 7, 24)
    out = block(x, kv)
    assert out.shape == x.shape
    assert not torch.allclose(block(x, kv + 1.0), out)
