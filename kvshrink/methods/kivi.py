"""``kivi``: asymmetric 2/4-bit quantisation, keys per channel and values per token, with a
full-precision residual window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvshrink.methods.base import Codec, Encoder, Payload, StreamPolicy, check
from kvshrink.methods.quant import GroupQuantEncoder, unpack
from kvshrink.methods.registry import register


@register
@dataclass
class KIVI(Codec):
    """KIVI, Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache",
    arXiv 2402.02750 (reference: github jy-yuan/KIVI, ``quant/new_pack.py``, ``models/llama_kivi.py``).

    Asymmetric min/max quantisation of a group ``X`` with ``b`` bits (paper eq. 1, reference
    ``triton_quantize_and_pack_along_last_dim``)::

        z = min X,   s = (max X - min X) / (2^b - 1),   Q(X) = round((X - z) / s),   X' = Q(X) * s + z

    - **Keys, per channel**: a group is ``group`` consecutive tokens of one channel (the reference
      quantises ``K^T`` along its last dim, i.e. along tokens). The encoder's chunk is ``group``.
      Residual ``R = residual`` tokens stay in full precision; at prefill of ``L`` tokens the first
      ``L - L % R`` are quantised (``llama_kivi.py`` prefill branch); in decode a new key joins the
      residual, which is quantised *whole* once it holds ``R`` tokens, so after every step the
      number of full-precision keys is ``len % R`` (``StreamPolicy(R, flush="full")``).
    - **Values, per token**: a group is ``group`` consecutive channels of one token. At prefill the
      last ``R`` tokens stay in full precision and the rest are quantised; in decode the oldest
      full-precision value is quantised as soon as the residual exceeds ``R``, so
      ``min(len, R)`` values stay in full precision (``StreamPolicy(R, flush="overflow")``, chunk 1).

    Storage (exact in ``bytes_per_token``): codes bit-packed 8/b per byte (uint8), scale and zero
    point float16. Per token and head: keys ``D*b/8 + 2*2*D/group``, values
    ``D*b/8 + 2*2*(D/group_v)``.

    Deviations from the reference code:
    - codes are packed into uint8 along the head dim (the reference packs 32/b codes into int32,
      keys along tokens); the byte count is the same, the layout keeps ``[B, H]`` leading dims so the
      engine can store blocks.
    - scale and zero are float16 whatever the model dtype (the reference keeps them in the model's
      dtype, float16 there); codes are computed against the rounded scale/zero so the error bound
      ``|x - x'| <= s/2`` holds for what is stored. A constant group (``s = 0``) decodes to its value
      instead of the reference's division by zero.
    - values: when ``group`` does not divide the head dim, the whole head dim is one group (the
      reference asserts divisibility).
    - ``residual`` must be a multiple of ``group`` (the reference asserts it at flush time).

    Eviction (H2O, StreamingLLM on top) works on the stored codes: a kept key keeps its codes and its
    group's scale/zero, whole key groups are kept or dropped, and no token is quantised twice
    (``methods.base.plan_cut``). On a sliding-window layer the window is stored the same way (key
    groups leave it whole).
    """

    name = "kivi"

    bits: int = 2
    group: int = 32
    residual: int = 128

    def __post_init__(self) -> None:
        check(self.bits in (2, 4), f"{self.name}: bits must be 2 or 4, got {self.bits}")
        check(self.group >= 1, f"{self.name}: group must be >= 1, got {self.group}")
        check(self.residual >= 0, f"{self.name}: residual must be >= 0, got {self.residual}")
        check(
            self.residual % self.group == 0,
            f"{self.name}: residual must be a multiple of group ({self.group}), got {self.residual}",
        )

    def key_encoder(self) -> Encoder:
        return GroupQuantEncoder(self.bits, self.group, along="tokens")

    def value_encoder(self) -> Encoder:
        return GroupQuantEncoder(self.bits, self.group, along="channels")

    def key_policy(self) -> StreamPolicy:
        return StreamPolicy(residual=self.residual, flush="full")

    def value_policy(self) -> StreamPolicy:
        return StreamPolicy(residual=self.residual, flush="overflow")

    def key_scores(self, q: torch.Tensor, p: Payload) -> torch.Tensor:
        """``q @ K'^T`` straight from a key payload, without materialising ``K'``.

        ``q``: ``[B, H, M, D]`` (fold a GQA group's query heads into ``M``). Returns ``[B, H, M, T]``.
        With codes ``c``, scale ``s`` and zero ``z`` of group ``g(t)`` (reference
        ``cuda_bmm_fA_qB_outer``)::

            q . k'_t = sum_d (q_d s_{g(t),d}) c_{t,d} + sum_d q_d z_{g(t),d}
        """
        c = unpack(p["q"], self.bits, torch.float32)
        B, H, T, D = c.shape
        G = self.group
        qf = q.float()
        s, z = p["scale"].float(), p["zero"].float()  # [B, H, T/G, D]
        qs = qf[:, :, :, None, :] * s[:, :, None, :, :]  # [B, H, M, T/G, D]
        cg = c.reshape(B, H, T // G, G, D)
        out = torch.einsum("bhmgd,bhgtd->bhmgt", qs, cg) + torch.einsum("bhmd,bhgd->bhmg", qf, z)[..., None]
        return out.reshape(B, H, q.shape[2], T).to(q.dtype)
