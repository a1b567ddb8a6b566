"""QuantCodec: int8, TurboQuant and Block-GTQ pages, one SidePlan per side (K, V) per layer.

Layers named in ``exclude_layers`` stay fp16 (the first and last layers are often the most sensitive).
Pages of a quantized layer hold code bytes and fp16 scales (one per width group) per token and KV head (and, for
keys with a QJL residual, sign bytes and an fp16 residual norm); decode attention
reads the codes directly (dequantization fused, see kernels/kv_quant.py), with the query moved into the
keys' transformed space instead of the keys moved back.

# T=tokens written, Bd=decode sequences, H=query heads, Hkv=KV heads, G=H//Hkv, D=head dim, N=blocks, S=block size
"""

from __future__ import annotations

import torch

from kernels.kv_quant import kv_encode, quant_paged_decode_attention, reference_kv_decode
from kernels.qjl import QJLResidual, qjl_decode, qjl_num_bytes, qjl_sketch_query
from workers.kv.codecs import IdentityCodec, KVCodec, LayerPages
from workers.kv.quant_plan import SidePlan


class QuantCodec(KVCodec):
    lossless = False

    def __init__(self, name: str, plans: list[tuple[SidePlan, SidePlan] | None], num_kv_heads: int, head_dim: int):
        self.name = name
        self.plans = plans  # per layer: (key plan, value plan), or None for an fp16 layer
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        # Excluded layers are plain fp16 pages: every call for them goes to this codec.
        self.fp16 = IdentityCodec(torch.float16, num_kv_heads, head_dim, lossless=False)

    def allocate(self, layer, num_blocks, block_size, device) -> LayerPages:
        plan = self.plans[layer]
        if plan is None:
            return self.fp16.allocate(layer, num_blocks, block_size, device)
        arrays = {}
        for side, side_plan in zip(("key", "value"), plan):
            arrays[f"{side}_codes"] = torch.zeros(num_blocks, block_size, self.num_kv_heads,
                                                  side_plan.layout.num_bytes, dtype=torch.uint8, device=device)
            arrays[f"{side}_scales"] = torch.zeros(num_blocks, block_size, self.num_kv_heads,
                                                   side_plan.layout.num_groups, dtype=torch.float16, device=device)
            if side_plan.qjl_projection is not None:
                token_head = (num_blocks, block_size, self.num_kv_heads)
                arrays[f"{side}_qjl_signs"] = torch.zeros(*token_head, qjl_num_bytes(self.head_dim), dtype=torch.uint8,
                                                          device=device)
                arrays[f"{side}_qjl_norms"] = torch.zeros(token_head, dtype=torch.float16, device=device)
        return LayerPages(layer, arrays)

    def write(self, pages, slot_mapping, key, value) -> None:
        plan = self.plans[pages.layer]
        if plan is None:
            self.fp16.write(pages, slot_mapping, key, value)
            return
        for side, tensor, side_plan in (("key", key, plan[0]), ("value", value, plan[1])):
            encoded = kv_encode(tensor, side_plan.transform, side_plan.center, side_plan.layout,
                                side_plan.qjl_projection)
            names = ("codes", "scales", "qjl_signs", "qjl_norms")[:len(encoded)]
            for name, array in zip(names, encoded):
                target = pages[f"{side}_{name}"]
                target.view(-1, *target.shape[2:]).index_copy_(0, slot_mapping, array)

    def gather(self, pages, block_ids):
        plan = self.plans[pages.layer]
        if plan is None:
            return self.fp16.gather(pages, block_ids)
        decoded = []
        for side, side_plan in zip(("key", "value"), plan):
            y = reference_kv_decode(pages[f"{side}_codes"][block_ids], pages[f"{side}_scales"][block_ids],
                                    side_plan.layout).flatten(0, 1)  # [n*S, Hkv, D] transformed
            if side_plan.qjl_projection is not None:  # + the residual's unbiased estimate
                y = y + qjl_decode(pages[f"{side}_qjl_signs"][block_ids], pages[f"{side}_qjl_norms"][block_ids],
                                   side_plan.qjl_projection).flatten(0, 1)
            decoded.append(side_plan.center + torch.einsum("hij,thj->thi", side_plan.inverse, y))
        return decoded[0], decoded[1]

    def decode_attention(self, query, pages, block_tables, seq_lens, scale, *, token_weights=None,
                         with_block_mass=False, tail_masks=None):
        plan = self.plans[pages.layer]
        if plan is None:
            return self.fp16.decode_attention(query, pages, block_tables, seq_lens, scale,
                                              token_weights=token_weights, with_block_mass=with_block_mass,
                                              tail_masks=tail_masks)
        key_plan, value_plan = plan
        num_seqs, num_heads, head_dim = query.shape
        grouped = query.float().view(num_seqs, self.num_kv_heads, num_heads // self.num_kv_heads, head_dim)
        # q.x = q.center + (inverse^T q).y: only the second term differs between keys, so it is all softmax needs.
        moved = torch.einsum("hji,bhgj->bhgi", key_plan.inverse, grouped).reshape(num_seqs, num_heads, head_dim)
        qjl = None
        if key_plan.qjl_projection is not None:
            qjl = QJLResidual(pages["key_qjl_signs"], pages["key_qjl_norms"],
                              qjl_sketch_query(moved, key_plan.qjl_projection))
        out = quant_paged_decode_attention(moved, pages["key_codes"], pages["key_scales"], key_plan.layout,
                                           pages["value_codes"], pages["value_scales"], value_plan.layout,
                                           block_tables, seq_lens, scale, token_weights=token_weights,
                                           with_block_mass=with_block_mass, qjl=qjl, tail_masks=tail_masks)
        mass = None
        if with_block_mass:
            out, mass = out
        # Probabilities sum to 1, so the value center comes back whole and the inverse map is applied once.
        out = out.view(num_seqs, self.num_kv_heads, -1, head_dim)
        out = value_plan.center[None, :, None, :] + torch.einsum("hij,bhgj->bhgi", value_plan.inverse, out)
        out = out.reshape(num_seqs, num_heads, head_dim).to(query.dtype)
        return (out, mass) if with_block_mass else out

    def bytes_per_token(self, layer: int) -> int:
        plan = self.plans[layer]
        if plan is None:
            return self.fp16.bytes_per_token(layer)
        return plan[0].bytes_per_token + plan[1].bytes_per_token
