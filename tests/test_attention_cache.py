"""inference_cache(): fused weights and the text context's k, v computed once per call, never stale."""

from __future__ import annotations

import torch

from latentdiff.attention import Attention, inference_cache


def _layers(seed: int = 0):
    torch.manual_seed(seed)
    return Attention(32, heads=4, head_dim=8).eval(), Attention(32, heads=4, head_dim=8, context_dim=24).eval()


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_cached_outputs_match_uncached_and_follow_the_context():
    self_attn, cross = _layers()
    x, context, other = torch.randn(2, 9, 32), torch.randn(2, 5, 24), torch.randn(2, 5, 24)
    plain_self, plain_cross, plain_other = self_attn(x), cross(x, context), cross(x, other)
    with inference_cache(self_attn, cross):
        for _ in range(2):  # the second step reads the cache
            _close(self_attn(x), plain_self)
            _close(cross(x, context), plain_cross)
        _close(cross(x, other), plain_other)  # another context tensor in the same call: encoded afresh
        assert set(self_attn._cache) == {"qkv"}
        # cross-attention keeps the context's k, v but not a fused copy of its k/v weights (memory)
        assert set(cross._cache) == {"context"} and cross._cache["context"][0] is other
    assert self_attn._cache is None and cross._cache is None  # dropped on exit


@torch.no_grad()
def test_weights_changed_between_calls_are_seen():
    self_attn, cross = _layers()
    x, context = torch.randn(1, 4, 32), torch.randn(1, 3, 24)
    with inference_cache(self_attn, cross):
        before_self, before_cross = self_attn(x), cross(x, context)
    for layer in (self_attn, cross):
        layer.to_k.weight.mul_(2.0)
        layer.to_v.weight.add_(0.5)
    with inference_cache(self_attn, cross):
        after_self, after_cross = self_attn(x), cross(x, context)
    _close(after_self, self_attn(x))
    _close(after_cross, cross(x, context))
    assert not torch.allclose(after_self, before_self) and not torch.allclose(after_cross, before_cross)


@torch.no_grad()
def test_big_layers_are_not_fused(monkeypatch):
    import latentdiff.attention as attention

    self_attn, cross = _layers()
    x, context = torch.randn(2, 9, 32), torch.randn(2, 5, 24)
    fused = self_attn(x)
    monkeypatch.setattr(attention, "FUSE_MAX_BYTES", 3 * 32 * 32 * 4 - 1)  # just below this layer's q/k/v
    with inference_cache(self_attn, cross):
        _close(self_attn(x), fused)
        cross(x, context)
        assert self_attn._cache == {}  # no fused copy held for the call (SD1.5 would hold ~150 MB)
