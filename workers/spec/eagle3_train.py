"""Train an EAGLE-3 head on local text (`tierserve train-drafter eagle3`), on CPU in minutes for a small target.

1. Features: the target reads the text in windows of seq_len tokens and keeps, per position, the captured states
   (the residual stream entering layers aux_layer_ids) and its top-k next-token log-probabilities.
2. Draft vocabulary: the draft_vocab_size tokens the target predicts most often there (d2t / t2d as EAGLE-3).
3. Training-time test (EAGLE-3): each batch is unrolled `ttt_steps` times. Step 0 reads the target's features;
   step s reads the head's own output of step s-1 (what drafting does) at position i + s, attending to the
   step-0 keys at positions <= i and to its own chain's keys of steps 1..s (the diagonal), exactly the keys a
   draft at that depth sees. Tokens are the text's (teacher forcing). Loss: cross-entropy against the target's
   distribution renormalised over the draft vocabulary (positions whose target argmax is outside it are
   skipped), weighted 0.8^s.

Resumable: a state file (head, optimizer, step, data order) is written every `save_every` steps; rerunning with
the same out_dir resumes. Progress (loss, step-0 top-1 agreement with the target, ETA) goes to stderr.

# B=batch, T=seq_len, E=hidden, C*Et=captured width, H/Hkv=heads, D=head dim, K=top-k kept, Vd=draft vocab
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

from workers.spec.eagle3 import Eagle3Head, head_config_for

STATE_FILE = "train_state.pt"


@dataclass(frozen=True)
class TrainConfig:
    seq_len: int = 256
    batch_size: int = 4
    ttt_steps: int = 3
    step_weight: float = 0.8
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_steps: int = 2000
    max_minutes: float | None = None
    draft_vocab_size: int = 8192
    top_k: int = 16
    save_every: int = 100
    seed: int = 0
    fc_norm: bool = True  # EAGLE 3.1


@dataclass
class Features:
    aux: torch.Tensor  # [N, T, C*Et] float16 (memory: half the bytes; the head fuses in fp32)
    token_ids: torch.Tensor  # [N, T]
    top_ids: torch.Tensor  # [N, T, K] the target's most likely next tokens at each position
    top_logprobs: torch.Tensor  # [N, T, K]


def _progress(message: str) -> None:
    print(f"\r[train-drafter] {message}", end="", file=sys.stderr, flush=True)


@torch.inference_mode()
def target_features(loaded, windows: list[list[int]], aux_layer_ids: tuple[int, ...], top_k: int) -> Features:
    """Run the target over each window (one prefill pass through the paged path) and keep what training needs."""
    from workers.attention import AttentionMetadata, PrefillChunk
    from workers.kv.presets import make_codec

    config, model = loaded.config, loaded.model
    seq_len = len(windows[0])
    block_size = 16
    num_blocks = -(-seq_len // block_size)
    codec = make_codec("auto", model_dtype=model.dtype, num_layers=config.num_layers,
                       num_kv_heads=config.num_kv_heads, head_dim=config.head_dim)
    pages = [codec.allocate(layer, num_blocks, block_size, model.device) for layer in range(config.num_layers)]
    meta = AttentionMetadata(slot_mapping=torch.arange(seq_len), num_decode_tokens=0, decode_block_tables=None,
                             decode_seq_lens=None, prefills=(PrefillChunk(0, seq_len, 0, torch.arange(num_blocks)),))
    aux_all, top_ids_all, top_logprobs_all = [], [], []
    started = time.monotonic()
    for index, window in enumerate(windows):
        hidden, aux = model.forward_captured(torch.tensor(window), torch.arange(seq_len), pages, codec, meta,
                                             aux_layer_ids)
        logprobs = torch.log_softmax(model.compute_logits(hidden), dim=-1)
        values, ids = logprobs.topk(top_k, dim=-1)
        aux_all.append(aux.to(torch.float16))
        top_ids_all.append(ids)
        top_logprobs_all.append(values)
        rate = (index + 1) * seq_len / (time.monotonic() - started)
        _progress(f"target features: window {index + 1}/{len(windows)} ({rate:.0f} tok/s)")
    print(file=sys.stderr)
    return Features(torch.stack(aux_all), torch.tensor(windows), torch.stack(top_ids_all),
                    torch.stack(top_logprobs_all))


def draft_vocabulary(features: Features, vocab_size: int, draft_vocab_size: int) -> torch.Tensor:
    """The draft_vocab_size target tokens predicted most often (the target's argmax), ascending ids."""
    counts = torch.bincount(features.top_ids[..., 0].flatten(), minlength=vocab_size)
    size = min(draft_vocab_size, vocab_size)
    return counts.topk(size).indices.sort().values


def build_head(loaded, features_vocab: torch.Tensor, config: TrainConfig, aux_layer_ids: tuple[int, ...]
               ) -> Eagle3Head:
    head_config = head_config_for(loaded.config, len(features_vocab), fc_norm=config.fc_norm,
                                  aux_layer_ids=aux_layer_ids)
    torch.manual_seed(config.seed)
    head = Eagle3Head(head_config, loaded.model.embed_tokens.weight.detach().float())
    head.d2t.copy_(features_vocab - torch.arange(len(features_vocab)))
    head.t2d.zero_()
    head.t2d[features_vocab] = True
    with torch.no_grad():  # the target's own output rows: a head that already speaks the target's vocabulary
        head.lm_head.weight.copy_(loaded.model.lm_head.weight.detach().float()[features_vocab])
    return head


def ttt_forward(head: Eagle3Head, aux: torch.Tensor, token_ids: torch.Tensor, ttt_steps: int) -> list[torch.Tensor]:
    """The unrolled draft: per step s, logits [B, T-1-s, Vd]; row i reads token i+1+s at position i+s and
    predicts the target's next token at position i+1+s (step 0 from the target's features, step s from the
    head's own step s-1 state)."""
    config = head.config
    batch, seq_len = token_ids.shape
    num_heads, num_kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
    hidden = head.fuse(aux.float())  # [B, T, E]
    context_keys = context_values = None
    chain_keys: list[torch.Tensor] = []
    chain_values: list[torch.Tensor] = []
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    step_logits = []
    for step in range(ttt_steps):
        rows = seq_len - 1 - step
        ids = token_ids[:, 1 + step:]  # [B, rows]
        step_hidden = hidden[:, :rows]
        positions = (torch.arange(rows) + step).repeat(batch)
        query, key, value = head.qkv(ids.reshape(-1), step_hidden.reshape(batch * rows, -1), positions)
        query = query.view(batch, rows, num_heads, head_dim).transpose(1, 2)  # [B, H, rows, D]
        key = key.view(batch, rows, num_kv_heads, head_dim).transpose(1, 2).repeat_interleave(
            num_heads // num_kv_heads, dim=1)
        value = value.view(batch, rows, num_kv_heads, head_dim).transpose(1, 2).repeat_interleave(
            num_heads // num_kv_heads, dim=1)
        if step == 0:
            context_keys, context_values = key, value
            scores = query @ key.transpose(-1, -2) * head.scale  # [B, H, rows, rows]
            out = scores.masked_fill(~causal[:rows, :rows], float("-inf")).softmax(-1) @ value
        else:
            # Row i of step s attends to the step-0 keys at positions <= i and to its own chain's keys of steps
            # 1..s (the diagonal): the keys a draft at depth s sees at inference.
            chain_keys.append(key)
            chain_values.append(value)
            scores = query @ context_keys[:, :, :rows].transpose(-1, -2) * head.scale
            scores = scores.masked_fill(~causal[:rows, :rows], float("-inf"))
            diagonal = torch.stack([(query * k[:, :, :rows]).sum(-1) * head.scale for k in chain_keys], dim=-1)
            probs = torch.cat([scores, diagonal], dim=-1).softmax(-1)  # [B, H, rows, rows + step]
            out = probs[..., :rows] @ context_values[:, :, :rows]
            for m, v in enumerate(chain_values):
                out = out + probs[..., rows + m:rows + m + 1] * v[:, :, :rows]
        out = out.transpose(1, 2).reshape(batch * rows, num_heads * head_dim)
        fed, logits = head.finish(step_hidden.reshape(batch * rows, -1), out)  # [B*rows, E], [B*rows, Vd]
        step_logits.append(logits.view(batch, rows, -1))
        hidden = torch.cat([fed.view(batch, rows, -1), hidden[:, rows:]], dim=1)  # the next step reads its own
    return step_logits


def ttt_loss(head: Eagle3Head, aux: torch.Tensor, token_ids: torch.Tensor, top_ids: torch.Tensor,
             top_logprobs: torch.Tensor, ttt_steps: int, step_weight: float, draft_index: torch.Tensor
             ) -> tuple[torch.Tensor, float]:
    """One batch's weighted unrolled loss, and step 0's top-1 agreement with the target (on scored positions).

    draft_index [V]: target id -> draft id, -1 outside the draft vocabulary."""
    total = torch.zeros(())
    agreement = 0.0
    for step, logits in enumerate(ttt_forward(head, aux, token_ids, ttt_steps)):
        logits = logits.reshape(-1, logits.shape[-1])
        draft_ids = draft_index[top_ids[:, 1 + step:].reshape(logits.shape[0], -1)]  # [B*rows, K], -1 outside
        scored = draft_ids[:, 0] >= 0  # the target's argmax is a draft token
        weights = top_logprobs[:, 1 + step:].reshape(logits.shape[0], -1).exp() * (draft_ids >= 0)
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-9)
        log_q = torch.log_softmax(logits.float(), dim=-1)
        cross_entropy = -(weights * log_q.gather(1, draft_ids.clamp_min(0))).sum(-1)
        total = total + step_weight ** step * (cross_entropy * scored).sum() / scored.sum().clamp_min(1)
        if step == 0:
            agreement = float(((logits.argmax(-1) == draft_ids[:, 0]) & scored).sum() / scored.sum().clamp_min(1))
    return total, agreement


def train(loaded, windows: list[list[int]], out_dir: str, config: TrainConfig) -> Eagle3Head:
    """Train (or resume) a head for `loaded` on these token windows; writes the head to out_dir and returns it."""
    from workers.spec.eagle3 import default_aux_layer_ids

    torch.manual_seed(config.seed)
    aux_layer_ids = default_aux_layer_ids(loaded.config.num_layers)
    features = target_features(loaded, windows, aux_layer_ids, config.top_k)
    vocab = draft_vocabulary(features, loaded.config.vocab_size, config.draft_vocab_size)
    head = build_head(loaded, vocab, config, aux_layer_ids)
    draft_index = torch.full((loaded.config.vocab_size,), -1, dtype=torch.long)
    draft_index[vocab] = torch.arange(len(vocab))
    optimizer = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    state_path = os.path.join(out_dir, STATE_FILE)
    step = 0
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(windows), generator=generator)
    if os.path.isfile(state_path):
        saved = torch.load(state_path, weights_only=False)
        head.load_state_dict(saved["head"])
        optimizer.load_state_dict(saved["optimizer"])
        step, order = saved["step"], saved["order"]
        print(f"[train-drafter] resuming at step {step}", file=sys.stderr)
    started = time.monotonic()
    start_step = step
    num_batches = max(1, len(windows) // config.batch_size)
    head.train()
    while step < config.max_steps:
        if config.max_minutes is not None and (time.monotonic() - started) / 60 >= config.max_minutes:
            break
        batch_index = step % num_batches
        if batch_index == 0 and step:
            order = torch.randperm(len(windows), generator=generator)
        picked = order[batch_index * config.batch_size:(batch_index + 1) * config.batch_size]
        lr = config.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / config.max_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, agreement = ttt_loss(head, features.aux[picked], features.token_ids[picked], features.top_ids[picked],
                                   features.top_logprobs[picked], config.ttt_steps, config.step_weight, draft_index)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        step += 1
        elapsed = time.monotonic() - started
        eta = elapsed / (step - start_step) * (config.max_steps - step)
        _progress(f"step {step}/{config.max_steps} loss {loss.item():.3f} top-1 {agreement:.2f} "
                  f"lr {lr:.1e} elapsed {elapsed / 60:.1f} min, eta {eta / 60:.1f} min")
        if step % config.save_every == 0 or step == config.max_steps:
            os.makedirs(out_dir, exist_ok=True)
            torch.save({"head": head.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                        "order": order}, state_path + ".tmp")
            os.replace(state_path + ".tmp", state_path)
    print(file=sys.stderr)
    head.config = dataclasses.replace(head.config, extra={
        "trained_steps": step, "windows": len(windows), "seq_len": config.seq_len, "ttt_steps": config.ttt_steps})
    head.eval().requires_grad_(False)
    head.save(out_dir)
    return head
