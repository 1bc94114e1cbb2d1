"""Train the embedded default model ``tiny``: a small Qwen3 and its Orthrus diffusion attention set.

One GPU, fixed seeds, a wall-clock budget per stage (the step counts reached are recorded):

1. the corpus: every ``*.py`` file of the running interpreter (standard library and site-packages: torch,
   transformers, jax, scipy, sympy, pandas, …), deduplicated by content, with whole packages held out for evaluation
   (``--heldout``; vendored copies of them are dropped) and every 100th file of the rest kept for validation; the
   manifest records every package with its version, file, byte and token counts, and a hash of the whole corpus;
2. a byte-level BPE tokenizer (vocabulary 6144 with <|endoftext|>, <|im_start|>, <|im_end|>, <|mask|>) trained on
   every 10th training file;
3. the base model (Qwen3 layout: 12 layers by default (``--layers``), hidden 256, 4 query / 2 KV heads of 64, tied
   embeddings) trained as a language model; the weights with the best validation loss are kept;
4. the base frozen, the diffusion set (``*_proj_diff``, ``*_norm_diff``, initialised from the AR set) trained by
   KL(AR || diffusion) distillation, on blocks of 32: block position i sees the AR keys/values of positions before
   the block's anchor and the block's own diffusion keys/values bidirectionally; its input is
   ``[x_anchor, M, …, M]`` and its target the AR distribution at the same position (single-step denoising; block
   position j's KL weighted by exp(-j / ``--kl-decay``)); with ``--chain-passes N`` the target is instead the AR
   distribution along the base's own greedy chain from the anchor (N Jacobi passes of the base within the block:
   rows 0..N exact, what a greedy verify would accept), not along the text; on
   the training text (``--diff-data real``, the default), on the base model's own greedy continuations of it
   (``generated``), or both (``both``: the one with the better validation block acceptance is written to --out,
   the other to ``recipe-NAME/``); weights with the best validation block acceptance (``block_acceptance``: tokens
   per cycle on the base's greedy continuations of validation code, cycles at block boundaries) are kept, and the
   recipes are compared by ``simulated_acceptance`` (the runtime's greedy cycles, anchored wherever the last one
   ended) on validation windows; it is also reported on held-out windows.

Resumable in parts (``--init-from DIR``, a checkpoint folder this script wrote, the shipped ``tiny`` included): the
model, its shape and its tokenizer come from DIR, the corpus must be the one DIR was trained on (its data manifest's
``corpus_sha256``: the same held-out packages and validation files, or the script refuses), the base model trains on
for ``--lm-seconds`` (0: kept as it is) and the diffusion set is distilled on from DIR's (``--diff-init checkpoint``,
the default with ``--init-from``) or from the AR set again (``ar``). The log keeps DIR's own log under ``init_from``.

Writes a checkpoint folder in the published Orthrus-Qwen3 layout (sharded safetensors, bf16; the other recipe's in
``recipe-NAME/`` with ``both``), the data manifest, held-out prompts, losses (JSON) and a loss plot to --out.

    bash scripts/train_tiny_gpu.sh   # the defaults: the shipped model (its card says what ran beside it)
"""

import argparse
import hashlib
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orthrus_export.synthetic import CHAT_TEMPLATE, SPECIALS  # noqa: E402

VOCAB, HEAD_DIM, BLOCK = 6144, 64, 32
SHAPE = {"layers": 12, "hidden": 256, "heads": 4, "kv_heads": 2, "ffn": 768}  # the defaults of --layers etc.
ROPE_THETA, EPS = 1_000_000.0, 1e-6


# ---- data ---------------------------------------------------------------------------------------------------------
# Whole packages are held out for evaluation (not only files): their code is never trained on, nor any vendored copy
# (a file with a path component of that name in another package is dropped).
HELDOUT_PACKAGES = ("networkx", "xarray", "rich", "statsmodels")
MAX_FILE_BYTES = 1_000_000  # larger *.py files are generated tables, not code


def h(s: str) -> int:
    return int(hashlib.sha1(s.encode()).hexdigest(), 16)


def corpus(heldout_packages=HELDOUT_PACKAGES):
    """Every ``*.py`` file of the running interpreter: its standard library and its site-packages.

    Returns (train, val, held, info). Each split is a list of (package, relative path, text), sorted by path.
    ``held``: the held-out packages; ``val``: every 100th file of the training packages (by a hash of its path), for
    choosing weights and recipes; ``train``: the rest. Files are deduplicated by content (the held-out copy wins),
    files over MAX_FILE_BYTES and empty files are skipped."""
    paths = sysconfig.get_paths()
    stdlib = Path(paths["stdlib"])
    entries = []
    for p in sorted(stdlib.rglob("*.py")):
        rel = p.relative_to(stdlib).as_posix()
        if not rel.startswith(("site-packages/", "dist-packages/")):
            entries.append(("stdlib", "stdlib/" + rel, p))
    for root in sorted({Path(paths["purelib"]), Path(paths["platlib"])}):
        for p in sorted(root.rglob("*.py")):
            rel = p.relative_to(root).as_posix()
            entries.append((rel.split("/")[0] if "/" in rel else rel[:-3], "site-packages/" + rel, p))
    held_set = set(heldout_packages)
    skipped = {"too_large_or_empty": 0, "duplicate": 0, "vendored_heldout": 0}
    seen, splits = set(), {"train": [], "val": [], "held": []}
    # held-out files first, so a training file with the same content is the one dropped
    for e in sorted(entries, key=lambda e: (e[0] not in held_set, e[1])):
        package, rel, p = e
        size = p.stat().st_size
        if size == 0 or size > MAX_FILE_BYTES:
            skipped["too_large_or_empty"] += 1
            continue
        raw = p.read_bytes()
        digest = hashlib.sha1(raw).hexdigest()
        if digest in seen:
            skipped["duplicate"] += 1
            continue
        seen.add(digest)
        if package in held_set:
            split = "held"
        elif held_set & set(rel.split("/")[1:-1]):
            skipped["vendored_heldout"] += 1
            continue
        else:
            split = "val" if h(rel) % 100 == 0 else "train"
        splits[split].append((package, rel, raw.decode("utf-8", errors="replace")))
    missing = held_set - {pk for pk, _, _ in splits["held"]}
    if missing:
        raise SystemExit(f"held-out packages not installed here: {sorted(missing)}; pick others with --heldout")
    for v in splits.values():
        v.sort(key=lambda e: e[1])
    return splits["train"], splits["val"], splits["held"], {"stdlib_root": str(stdlib), "site_packages": sorted(
        {paths["purelib"], paths["platlib"]}), "skipped_files": skipped}


def package_versions(names):
    from importlib import metadata
    dists = metadata.packages_distributions()
    out = {}
    for n in sorted(names):
        if n == "stdlib":
            out[n] = "python " + sys.version.split()[0]
            continue
        found = []
        for d in dists.get(n, []):
            try:
                found.append(f"{d} {metadata.version(d)}")
            except metadata.PackageNotFoundError:
                pass
        out[n] = ", ".join(sorted(set(found))) or None
    return out


def encode_all(tok, docs, eot):
    """One int32 stream: each document's tokens then <|endoftext|>; and each document's token count."""
    encs = tok.encode_batch([t for _, _, t in docs])
    counts = [len(e.ids) for e in encs]
    stream = torch.cat([torch.tensor(e.ids + [eot], dtype=torch.int32) for e in encs]) if encs else \
        torch.empty(0, dtype=torch.int32)
    return stream, counts


def prompt_windows(tok, docs, n, per_file=1, tokens=96):
    """``n`` prompts of ``tokens`` tokens from ``docs``: files in a fixed hashed order, taken round-robin over the
    packages (so the first prompts cover every package), one window per file at a hashed offset."""
    by_pkg = {}
    for pk, rel, text in sorted(docs, key=lambda d: h(d[1])):
        by_pkg.setdefault(pk, []).append((rel, text))
    queues = [(k, by_pkg[k]) for k in sorted(by_pkg)]
    prompts, i = [], 0
    while len(prompts) < n and any(q for _, q in queues):
        pk, q = queues[i % len(queues)]
        i += 1
        while q:
            rel, text = q.pop(0)
            ids = tok.encode(text).ids
            if len(ids) < 400:
                continue
            start = h(rel + ":0") % (len(ids) - 300)
            prompts.append({"package": pk, "file": rel, "token_offset": start, "text": tok.decode(ids[start:start + tokens])})
            break
    return prompts


def train_tokenizer(texts, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE, "model_max_length": 4096, "clean_up_tokenization_spaces": False}, indent=2))
    return tok, {s: tok.token_to_id(s) for s in SPECIALS}


# ---- model (Qwen3 semantics, two attention sets) ------------------------------------------------------------------
def rms(x, w):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def rope(x, cos, sin):
    h = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin


class Tiny(torch.nn.Module):
    def __init__(self, layers=SHAPE["layers"], hidden=SHAPE["hidden"], heads=SHAPE["heads"],
                 kv_heads=SHAPE["kv_heads"], ffn=SHAPE["ffn"]):
        super().__init__()
        self.shape = {"layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads, "ffn": ffn}
        self.heads, self.kv_heads = heads, kv_heads
        P = torch.nn.Parameter
        self.embed = P(torch.randn(VOCAB, hidden) * 0.02)
        self.norm = P(torch.ones(hidden))
        q, kv = heads * HEAD_DIM, kv_heads * HEAD_DIM

        def lin(o, i):
            return P(torch.randn(o, i) / math.sqrt(i))
        self.layers = torch.nn.ModuleList()
        for _ in range(layers):
            m = torch.nn.Module()
            m.ln1, m.ln2 = P(torch.ones(hidden)), P(torch.ones(hidden))
            m.q, m.k, m.v, m.o = lin(q, hidden), lin(kv, hidden), lin(kv, hidden), lin(hidden, q)
            m.o.data /= math.sqrt(2 * layers)
            m.qn, m.kn = P(torch.ones(HEAD_DIM)), P(torch.ones(HEAD_DIM))
            m.gate, m.up, m.down = lin(ffn, hidden), lin(ffn, hidden), lin(hidden, ffn)
            m.down.data /= math.sqrt(2 * layers)
            self.layers.append(m)

    def add_diffusion_set(self):
        for m in self.layers:
            for n in ("q", "k", "v", "o", "qn", "kn"):
                setattr(m, n + "_diff", torch.nn.Parameter(getattr(m, n).detach().clone()))

    def rope_tables(self, n, device):
        inv = 1.0 / (ROPE_THETA ** (torch.arange(0, HEAD_DIM, 2, device=device).float() / HEAD_DIM))
        f = torch.arange(n, device=device).float()[:, None] * inv[None]
        e = torch.cat([f, f], -1)
        return e.cos(), e.sin()

    def qkv(self, m, h, suffix, cos, sin):
        b, t, _ = h.shape
        q = rms(F.linear(h, getattr(m, "q" + suffix)).view(b, t, self.heads, HEAD_DIM), getattr(m, "qn" + suffix))
        k = rms(F.linear(h, getattr(m, "k" + suffix)).view(b, t, self.kv_heads, HEAD_DIM),
                getattr(m, "kn" + suffix))
        v = F.linear(h, getattr(m, "v" + suffix)).view(b, t, self.kv_heads, HEAD_DIM)
        q, k = rope(q, cos[:, None], sin[:, None]), rope(k, cos[:, None], sin[:, None])
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def mlp(self, m, x):
        h = rms(x, m.ln2)
        return x + F.linear(F.silu(F.linear(h, m.gate)) * F.linear(h, m.up), m.down)

    def head(self, x):
        return F.linear(rms(x, self.norm), self.embed)

    def forward_ar(self, ids, keep_kv=False):
        b, t = ids.shape
        cos, sin = self.rope_tables(t, ids.device)
        x = F.embedding(ids, self.embed)
        kvs = []
        for m in self.layers:
            q, k, v = self.qkv(m, rms(x, m.ln1), "", cos, sin)
            if keep_kv:
                kvs.append((k, v))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + F.linear(a.transpose(1, 2).reshape(b, t, -1), m.o)
            x = self.mlp(m, x)
        return self.head(x), kvs

    def forward_cached(self, ids, cache, start, cos, sin):
        """``ids`` [b, t] at positions start..start+t-1; ``cache``: per layer [k, v], each [b, Hkv, T, D], holding the
        positions before ``start``. Writes the new K/V and returns the last position's logits."""
        b, t = ids.shape
        c, s = cos[start:start + t], sin[start:start + t]
        x = F.embedding(ids, self.embed)
        for m, (kc, vc) in zip(self.layers, cache):
            q, k, v = self.qkv(m, rms(x, m.ln1), "", c, s)
            kc[:, :, start:start + t], vc[:, :, start:start + t] = k, v
            a = F.scaled_dot_product_attention(q, kc[:, :, :start + t], vc[:, :, :start + t], is_causal=t > 1,
                                               enable_gqa=True)
            x = x + F.linear(a.transpose(1, 2).reshape(b, t, -1), m.o)
            x = self.mlp(m, x)
        return self.head(x[:, -1:])[:, 0]

    @torch.no_grad()
    def greedy(self, prompts, total):
        """Greedy continuations of ``prompts`` [b, t] to ``total`` tokens (with a KV cache)."""
        b, t = prompts.shape
        cos, sin = self.rope_tables(total, prompts.device)
        dtype = torch.bfloat16 if prompts.is_cuda else torch.float32
        cache = [[torch.zeros(b, self.kv_heads, total, HEAD_DIM, device=prompts.device, dtype=dtype) for _ in range(2)]
                 for _ in self.layers]
        out = torch.empty(b, total, dtype=prompts.dtype, device=prompts.device)
        out[:, :t] = prompts
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=prompts.is_cuda):
            logits = self.forward_cached(prompts, cache, 0, cos, sin)
            for pos in range(t, total):
                out[:, pos] = logits.argmax(-1)
                if pos + 1 < total:
                    logits = self.forward_cached(out[:, pos:pos + 1], cache, pos, cos, sin)
        return out

    def forward_diffusion(self, ids, kvs, mask_id, anchors=None):
        """Draft blocks of BLOCK positions, each from its anchor: input [x_anchor, M, ...] at positions anchor …
        anchor+BLOCK-1, attending to the AR K/V (``kvs``, of ``ids``) before the anchor plus its own block (no causal
        mask). ``anchors`` None: every block of ``ids`` (anchors 0, BLOCK, 2·BLOCK, …; logits [b, t, V], the
        training layout); else a 1-D tensor of anchor positions shared by the rows (logits [b, len(anchors)·BLOCK,
        V], block after block: the runtime's draft pass at each anchor)."""
        b, t = ids.shape
        if anchors is None:
            pos = torch.arange(t, device=ids.device)
            anchor = pos - pos % BLOCK
            z = torch.where((pos % BLOCK == 0)[None], ids, torch.full_like(ids, mask_id))
        else:
            pos = (anchors[:, None] + torch.arange(BLOCK, device=ids.device)).reshape(-1)
            anchor = anchors.repeat_interleave(BLOCK)
            z = torch.full((b, pos.numel()), mask_id, dtype=ids.dtype, device=ids.device)
            z[:, ::BLOCK] = ids[:, anchors]
        return self._block_pass(z, kvs, pos, anchor, "_diff", causal=False)

    def _block_pass(self, z, kvs, pos, anchor, suffix, causal):
        """Tokens ``z`` [b, n] at positions ``pos`` [n], each in the block of its ``anchor`` [n]: every query attends
        to the AR K/V (``kvs``) before its anchor plus its own block's keys (bidirectionally, or up to itself when
        ``causal``), with the attention set named by ``suffix`` ("_diff": the draft; "": the base model)."""
        b, n = z.shape
        t = kvs[0][0].shape[2]
        cos, sin = self.rope_tables(int(pos.max()) + 1, z.device)
        cos, sin = cos[pos], sin[pos]
        allowed_ar = torch.arange(t, device=z.device)[None, :] < anchor[:, None]  # AR keys before the anchor
        allowed_own = anchor[None, :] == anchor[:, None]                           # own block
        if causal:
            allowed_own &= pos[None, :] <= pos[:, None]
        mask = torch.cat([allowed_ar, allowed_own], dim=1)
        x = F.embedding(z, self.embed)
        for m, (k_ar, v_ar) in zip(self.layers, kvs):
            q, k, v = self.qkv(m, rms(x, m.ln1), suffix, cos, sin)
            a = F.scaled_dot_product_attention(q, torch.cat([k_ar, k], 2), torch.cat([v_ar, v], 2),
                                               attn_mask=mask, enable_gqa=True)
            x = x + F.linear(a.transpose(1, 2).reshape(b, n, -1), getattr(m, "o" + suffix))
            x = self.mlp(m, x)
        return self.head(x)

    @torch.no_grad()
    def chain_targets(self, ids, teacher, kvs, passes):
        """The base model's logits at every block position of ``ids`` (the training layout: anchors 0, BLOCK, …) given
        the block's *greedy chain* instead of the text: row j of a block gets p(· | text up to the anchor, g_1 … g_j),
        g the base model's greedy continuation from the anchor — what a draft at row j must match to be accepted
        (the runtime verifies drafts against the greedy chain, and the text after the anchor is not it). Jacobi
        iteration from the teacher-forced logits ``teacher`` (``forward_ar(ids)``; ``kvs`` its K/V): each pass runs
        the base on [x_anchor, g_1, …] of every block at once (causal within the block, the text's K/V before it)
        and refreshes g from its argmax; after ``passes`` passes rows 0 … ``passes`` are exact, later rows
        approximate (0 passes: ``teacher`` itself, the text-conditioned targets)."""
        b, t = ids.shape
        pos = torch.arange(t, device=ids.device)
        anchor = pos - pos % BLOCK
        inner = (pos % BLOCK != 0)[None]
        logits = teacher
        for _ in range(passes):
            guess = torch.cat([ids[:, :1], logits[:, :-1].argmax(-1)], 1)  # g at position i: argmax of row i-1
            logits = self._block_pass(torch.where(inner, guess, ids), kvs, pos, anchor, "", causal=True)
        return logits

    @classmethod
    def from_checkpoint(cls, folder):
        """The model of a checkpoint folder this script wrote (float32; the inverse of ``hf_state_dict``)."""
        from safetensors.torch import load_file
        folder = Path(folder)
        cfg = json.loads((folder / "config.json").read_text())
        model = cls(layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"], heads=cfg["num_attention_heads"],
                    kv_heads=cfg["num_key_value_heads"], ffn=cfg["intermediate_size"])
        model.add_diffusion_set()
        tensors = {}
        for f in sorted(folder.glob("model*.safetensors")):
            tensors.update(load_file(f))
        mine = model.hf_state_dict()
        assert set(mine) == set(tensors), sorted(set(mine) ^ set(tensors))
        with torch.no_grad():
            for name, param in model._hf_params().items():
                param.copy_(tensors[name].float())
        return model

    def _hf_params(self):
        """Checkpoint name -> parameter (``hf_state_dict`` without the copies)."""
        out = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.norm}
        names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                 "qn": "self_attn.q_norm", "kn": "self_attn.k_norm"}
        for i, m in enumerate(self.layers):
            p = f"model.layers.{i}."
            out[p + "input_layernorm.weight"], out[p + "post_attention_layernorm.weight"] = m.ln1, m.ln2
            out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = m.gate, m.up
            out[p + "mlp.down_proj.weight"] = m.down
            for short, long in names.items():
                out[f"{p}{long}.weight"] = getattr(m, short)
                if hasattr(m, short + "_diff"):
                    out[f"{p}{long}_diff.weight"] = getattr(m, short + "_diff")
        return out

    def hf_state_dict(self):
        return {k: v.detach().to(torch.bfloat16).cpu().contiguous() for k, v in self._hf_params().items()}


# ---- training -----------------------------------------------------------------------------------------------------
def batches(tokens, seq, batch, gen, device):
    """Random windows of ``seq`` tokens from a token stream (kept on the device), drawn with a host generator."""
    tokens = tokens.to(device)
    n, ar = tokens.numel() - seq, torch.arange(seq, device=device)
    while True:
        idx = torch.randint(0, n, (batch,), generator=gen).to(device)
        yield tokens[idx[:, None] + ar].long()


@torch.no_grad()
def block_acceptance(model, seqs, mask_id, prompt_len):
    """The acceptance length (tokens per cycle) the drafts would reach if every cycle started at a block boundary:
    for each block of ``seqs`` after ``prompt_len``, 1 + the number of leading draft tokens (argmax of the diffusion
    logits) equal to the AR argmax at the same positions. ``seqs`` are the base model's greedy continuations, so this
    is how Orthrus accepts; a proxy of the runtime's figure (whose cycles start wherever the last one ended), cheap
    enough to choose weights with."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=seqs.is_cuda):
        teacher, kvs = model.forward_ar(seqs, keep_kv=True)
        student = model.forward_diffusion(seqs, kvs, mask_id)
    t, d = teacher.argmax(-1), student.argmax(-1)
    b, n = seqs.shape
    blocks = (n - prompt_len) // BLOCK
    lo, hi = prompt_len, prompt_len + blocks * BLOCK
    match = (t[:, lo:hi] == d[:, lo:hi]).view(b, blocks, BLOCK)[..., :BLOCK - 1]
    accepted = match.int().cumprod(-1).sum(-1)  # leading matches per block
    return float(accepted.float().mean()) + 1.0


@torch.no_grad()
def simulated_acceptance(model, seqs, prompt_len, mask_id, chunk=4):
    """What the runtime's greedy Orthrus loop accepts on ``seqs`` [b, n]: ``prompt_len`` prompt tokens, then the base
    model's greedy continuation (greedy Orthrus emits exactly it). The prefill yields the token at ``prompt_len``,
    which anchors the first cycle; a cycle at anchor s drafts s+1 … s+BLOCK-1 in one diffusion pass, accepts the
    leading drafts equal to the sequence, emits them and the bonus token, and the next cycle is anchored after them.
    Every anchor's drafts come from one batched pass (``forward_diffusion`` with ``anchors``); the cycles are then
    walked on the host. Returns {"acceptance": token-weighted acceptance length (tokens emitted by cycles /
    cycles), "by_position": the fraction of cycles accepting each draft position, "cycles", "tokens"}."""
    b, n = seqs.shape
    anchors = torch.arange(prompt_len, n - 1, device=seqs.device)
    target_pos = anchors[:, None] + 1 + torch.arange(BLOCK - 1, device=seqs.device)
    lead = []
    for i in range(0, b, chunk):
        x = seqs[i:i + chunk]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
            _, kvs = model.forward_ar(x, keep_kv=True)
            logits = model.forward_diffusion(x, kvs, mask_id, anchors)
        drafts = logits.argmax(-1).view(x.shape[0], len(anchors), BLOCK)[..., :BLOCK - 1]
        match = (drafts == x[:, target_pos.clamp(max=n - 1)]) & (target_pos < n)
        lead.append(match.int().cumprod(-1).sum(-1).cpu())
    lead = torch.cat(lead).tolist()
    tokens = cycles = 0
    per_position = [0] * (BLOCK - 1)
    for row in lead:
        s = prompt_len
        while s < n - 1:
            accepted = row[s - prompt_len]
            for j in range(accepted):
                per_position[j] += 1
            tokens += accepted + 1
            cycles += 1
            s += accepted + 1
    return {"acceptance": tokens / cycles, "by_position": [c / cycles for c in per_position], "cycles": cycles,
            "tokens": tokens}


def lr_at(frac, peak, warm=0.05):
    return peak * min(1.0, frac / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def run_stage(name, params, loss_fn, data, seconds, peak_lr, log, max_steps, eval_fn, eval_every=100):
    """Train until the time budget; evaluate on held-out data at the start and every ``eval_every`` steps and keep the
    best weights (early stopping: the training set is small)."""
    opt = torch.optim.AdamW(params, lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.1, fused=torch.cuda.is_available())
    t0, step, hist = time.perf_counter(), 0, []
    held = eval_fn()  # the starting weights compete too: training on from a checkpoint never ends worse than it began
    evals, best = [(0, held)], (held, 0, [p.detach().clone() for p in params])
    while step < max_steps:
        frac = (time.perf_counter() - t0) / seconds if seconds > 0 else 1.0  # 0 s: keep the weights as they are
        if frac >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(frac, peak_lr)
        batch = next(data)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_available()):
            loss = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        loss = loss.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 25 == 0 or step == 1:
            hist.append((step, round(time.perf_counter() - t0, 2), float(loss)))
        if step % eval_every == 0:
            held = eval_fn()
            evals.append((step, held))
            print(f"{name} step {step} t={time.perf_counter() - t0:.0f}s train {hist[-1][2]:.4f} held-out {held:.4f}",
                  flush=True)
            if held < best[0]:
                best = (held, step, [p.detach().clone() for p in params])
    held = eval_fn()  # the final weights compete too
    evals.append((step, held))
    if held < best[0]:
        best = (held, step, [p.detach().clone() for p in params])
    with torch.no_grad():
        for p, b in zip(params, best[2]):
            p.copy_(b)
    log[name] = {"steps": step, "seconds": round(time.perf_counter() - t0, 1), "curve": hist, "heldout_curve": evals,
                 "best_step": best[1], "best_heldout": best[0]}
    print(f"{name}: kept step {best[1]} (held-out {best[0]:.4f})", flush=True)
    return step


def resolve_init(a):
    """--init-from's folder (``tiny``: the shipped model), checked to be a checkpoint this script wrote; None without
    it. --diff-init checkpoint needs it."""
    if a.init_from is None:
        if a.diff_init == "checkpoint":
            raise SystemExit("train_tiny: --diff-init checkpoint needs --init-from")
        return None
    if a.init_from == "tiny":
        from orthrus_export.checkpoint import TINY_DIR
        return TINY_DIR
    init = Path(a.init_from)
    missing = [f for f in ("config.json", "tokenizer.json", "data_manifest.json", "train_log.json")
               if not (init / f).is_file()]
    if missing:
        raise SystemExit(f"train_tiny: --init-from {init} is not a folder this script wrote (no {', '.join(missing)})")
    return init


def copy_tokenizer(init: Path, out: Path):
    """The tokenizer of ``init`` (a resumed model keeps its vocabulary), copied to ``out``."""
    from tokenizers import Tokenizer
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (init / f).resolve() != (out / f).resolve():
            (out / f).write_bytes((init / f).read_bytes())
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    specials = {sp: tok.token_to_id(sp) for sp in SPECIALS}
    assert None not in specials.values() and tok.get_vocab_size() == VOCAB, (specials, tok.get_vocab_size())
    return tok, specials


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--lm-seconds", type=float, default=270)
    ap.add_argument("--diff-seconds", type=float, default=420, help="per diffusion recipe")
    ap.add_argument("--diff-data", choices=("real", "generated", "both"), default="real",
                    help="distil the diffusion set on the training text, on the base model's greedy continuations "
                         "of it, or train both and keep the one with the better simulated acceptance on validation "
                         "windows")
    ap.add_argument("--gen-seconds", type=float, default=45, help="time for generating greedy continuations")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--max-steps", type=int, default=10**9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heldout", default=",".join(HELDOUT_PACKAGES), help="comma-separated held-out packages")
    ap.add_argument("--prompts", type=int, default=48, help="held-out prompts to write")
    ap.add_argument("--tokenizer-every", type=int, default=10,
                    help="train the tokenizer on every N-th training file (by a hash of its path)")
    ap.add_argument("--files-every", type=int, default=1, help="smoke runs: keep every N-th file")
    for name, v in SHAPE.items():
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=v, help="model shape (head_dim 64)")
    ap.add_argument("--kl-decay", type=float, default=5.0,
                    help="weight block position j's KL by exp(-j / this) (0: every position alike); later positions "
                         "only count when every earlier draft was accepted")
    ap.add_argument("--chain-passes", type=int, default=0,
                    help="distil towards the base model's greedy chain within each block (Model.chain_targets: this "
                         "many Jacobi passes of the base per step; rows 0..N exact) instead of the text-conditioned "
                         "AR distribution (0)")
    ap.add_argument("--init-from", default=None,
                    help="a checkpoint folder this script wrote (or 'tiny', the shipped one): go on training it")
    ap.add_argument("--diff-init", choices=("ar", "checkpoint"), default=None,
                    help="what the diffusion set starts from: a copy of the AR set (the default without --init-from) "
                         "or the --init-from checkpoint's diffusion set (the default with it)")
    a = ap.parse_args()
    init = resolve_init(a)
    t_start = time.time()
    torch.manual_seed(a.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = {"args": vars(a)}

    train, val, held, info = corpus(tuple(x for x in a.heldout.split(",") if x))
    if a.files_every > 1:
        # a hash of its own: h(path) % 100 chooses the validation files, and the two must not be correlated
        train, val, held = ([d for d in docs if h('files-every:' + d[1]) % a.files_every == 0]
                            for docs in (train, val, held))
    fingerprint = hashlib.sha256("\n".join(f"{rel} {hashlib.sha1(t.encode()).hexdigest()}" for docs in
                                           (train, val, held) for _, rel, t in docs).encode()).hexdigest()
    if init is not None:
        theirs = json.loads((init / "data_manifest.json").read_text())["corpus_sha256"]
        if theirs != fingerprint:
            raise SystemExit(f"train_tiny: the corpus here (sha256 {fingerprint[:12]}…) is not the one {init} was "
                             f"trained on ({theirs[:12]}…): going on would train on its held-out or validation "
                             "files; run on the machine (and with the --heldout and --files-every) that trained it")
        log["init_from"] = {"path": str(init), "log": json.loads((init / "train_log.json").read_text())}
    t0 = time.perf_counter()
    if init is None:
        tok, specials = train_tokenizer([t for _, rel, t in train if h(rel) % a.tokenizer_every == 0], out)
    else:
        tok, specials = copy_tokenizer(init, out)
    log["tokenizer_seconds"] = round(time.perf_counter() - t0, 1)
    eot, mask_id = specials["<|endoftext|>"], specials["<|mask|>"]
    t0 = time.perf_counter()
    streams, counts = {}, {}
    for name, docs in (("train", train), ("val", val), ("held", held)):
        streams[name], counts[name] = encode_all(tok, docs, eot)
    log["encode_seconds"] = round(time.perf_counter() - t0, 1)

    packages = {}
    for split, docs in (("train", train), ("val", val), ("held", held)):
        for (pk, _, text), n in zip(docs, counts[split]):
            e = packages.setdefault(pk, {"split": "heldout" if split == "held" else "train", "files": 0, "bytes": 0,
                                         "tokens": 0, "val_files": 0})
            e["files"] += 1
            e["val_files"] += split == "val"
            e["bytes"] += len(text.encode())
            e["tokens"] += n
    for pk, v in package_versions(packages).items():
        packages[pk]["version"] = v
    totals = {s: {"files": len(d), "bytes": sum(len(t.encode()) for _, _, t in d), "tokens": sum(counts[s])}
              for s, d in (("train", train), ("val", val), ("held", held))}
    data_manifest = {
        "source": "every *.py file of the training machine's Python: its standard library and its site-packages",
        "python": sys.version.split()[0], **info,
        "split": "whole packages held out: " + ", ".join(sorted({pk for pk, _, _ in held})) +
                 " (and any vendored copy of them dropped); of the rest, validation when int(sha1(path), 16) % 100 "
                 "== 0, else training; files deduplicated by content, files over 1 MB skipped",
        "files_every": a.files_every, "tokenizer": f"byte-level BPE, vocabulary {VOCAB}, trained on every "
                                                   f"{a.tokenizer_every}th training file",
        "totals": totals, "corpus_sha256": fingerprint, "packages": packages,
        "heldout_files": [[rel, len(t.encode())] for _, rel, t in held]}
    (out / "data_manifest.json").write_text(json.dumps(data_manifest, indent=1))
    print(f"{totals['train']['files']} train files ({totals['train']['bytes'] / 1e6:.1f} MB, "
          f"{totals['train']['tokens'] / 1e6:.1f} M tokens), {totals['val']['files']} validation, "
          f"{totals['held']['files']} held out ({totals['held']['tokens'] / 1e6:.2f} M tokens) in "
          f"{time.time() - t_start:.0f} s", flush=True)

    prompts = prompt_windows(tok, held, a.prompts)
    (out / "heldout_prompts.json").write_text(json.dumps(prompts, indent=1))

    def fixed(stream, n, seed, seq=a.seq + 1):
        g = batches(stream, seq, 32, torch.Generator().manual_seed(seed), device)
        return [next(g) for _ in range(n)]
    val_batches, held_batches = fixed(streams["val"], 4, 1), fixed(streams["held"], 4, 2)

    def mean_loss(loss_fn, bs):
        def run():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
                return sum(float(loss_fn(b)) for b in bs) / len(bs)
        return run

    if init is None:
        model = Tiny(**{k: getattr(a, k) for k in SHAPE}).to(device)
    else:
        model = Tiny.from_checkpoint(init).to(device)
        for k, v in model.shape.items():  # the checkpoint's shape, whatever the shape options said (log["args"]
            setattr(a, k, v)             # is vars(a): it records them)
    gen = torch.Generator().manual_seed(a.seed)
    data = batches(streams["train"], a.seq + 1, a.batch, gen, device)

    def lm_loss(batch):
        logits, _ = model.forward_ar(batch[:, :-1])
        return F.cross_entropy(logits.float().reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
    lm_params = [p for n, p in model.named_parameters() if not n.endswith("_diff")]
    run_stage("lm", lm_params, lm_loss, data, a.lm_seconds, 3e-3, log, a.max_steps, mean_loss(lm_loss, val_batches))
    log["val_lm_loss"] = mean_loss(lm_loss, val_batches)()
    log["heldout_lm_loss"] = mean_loss(lm_loss, held_batches)()

    # the base model's greedy continuations: 64 real tokens, then greedy (validation: for the block acceptance)
    model.eval()
    prompt_len, chunk = 64, 512
    val_greedy = torch.cat([model.greedy(b[:, :prompt_len], prompt_len + 8 * BLOCK) for b in
                            fixed(streams["val"], 8, 3)])
    # as the runtime decodes (eval_tiny's layout: 96 prompt tokens, 128 new): validation and held-out windows
    sim_prompt = 96
    sim = {split: model.greedy(fixed(streams[split], 1, seed)[0][:, :sim_prompt], sim_prompt + 128)
           for split, seed in (("val", 4), ("held", 5))}
    t_gen, generated = time.perf_counter(), []
    gen_prompts = batches(streams["train"], prompt_len, chunk, gen, device)
    while a.diff_data != "real" and (not generated or time.perf_counter() - t_gen < a.gen_seconds):
        generated.append(model.greedy(next(gen_prompts), a.seq))
    generated = torch.cat(generated) if generated else torch.empty(0, a.seq, dtype=torch.int64, device=device)
    log["greedy_continuations"] = {"sequences": generated.shape[0], "tokens": generated.numel(),
                                   "seconds": round(time.perf_counter() - t_gen, 1),
                                   "recipe": f"{prompt_len} real training tokens + greedy continuation to {a.seq} by "
                                             "the trained base model (KV cache, bf16)"}
    print(f"generated {generated.shape[0]} greedy continuations in {log['greedy_continuations']['seconds']} s",
          flush=True)
    model.train()

    def generated_batches():
        g = torch.Generator().manual_seed(a.seed + 1)
        while True:
            idx = torch.randint(0, generated.shape[0], (a.batch,), generator=g).to(device)
            yield generated[idx]

    if init is None:
        model.add_diffusion_set()
        model.to(device)
    named = dict(model.named_parameters())
    diff_params = [p for n, p in named.items() if n.endswith("_diff")]
    ar_params = [named[n[:-len("_diff")]] for n in named if n.endswith("_diff")]
    diff_init = a.diff_init or ("ar" if init is None else "checkpoint")
    start = [p.detach().clone() for p in (ar_params if diff_init == "ar" else diff_params)]
    log["diff_init"] = diff_init
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith("_diff"))

    def kl_loss(batch):
        x = batch[:, :a.seq]
        with torch.no_grad():
            teacher, kvs = model.forward_ar(x, keep_kv=True)
            teacher = model.chain_targets(x, teacher, kvs, a.chain_passes)
        student = model.forward_diffusion(x, kvs, mask_id)
        j = torch.arange(x.shape[1], device=x.device) % BLOCK  # block position
        keep = j != BLOCK - 1  # the last row drafts nothing
        weight = torch.exp(-j[keep] / a.kl_decay) if a.kl_decay > 0 else torch.ones_like(j[keep], dtype=torch.float)
        t = F.log_softmax(teacher.float()[:, keep], -1)
        s = F.log_softmax(student.float()[:, keep], -1)
        kl = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
        return (kl * weight).mean() / weight.mean()

    def neg_block_acceptance():  # lower is better for run_stage
        return -block_acceptance(model, val_greedy, mask_id, prompt_len)

    recipes = ("real", "generated") if a.diff_data == "both" else (a.diff_data,)
    log["recipes"] = {}
    kept = {}
    for recipe in recipes:
        with torch.no_grad():  # the diffusion set starts as a copy of the AR attention set, or of --init-from's
            for d, p in zip(diff_params, start):
                d.copy_(p)
        run_stage("diffusion_" + recipe, diff_params, kl_loss, data if recipe == "real" else generated_batches(),
                  a.diff_seconds, 2e-3, log, a.max_steps, neg_block_acceptance)
        model.eval()
        sim_val = simulated_acceptance(model, sim["val"], sim_prompt, mask_id)
        sim_held = simulated_acceptance(model, sim["held"], sim_prompt, mask_id)
        log["recipes"][recipe] = {"val_block_acceptance": -neg_block_acceptance(),
                                  "val_simulated_acceptance": sim_val["acceptance"],
                                  "val_simulated_by_position": [round(v, 4) for v in sim_val["by_position"][:8]],
                                  "heldout_simulated_acceptance": sim_held["acceptance"],
                                  "heldout_simulated_by_position": [round(v, 4) for v in sim_held["by_position"][:8]],
                                  "val_kl": mean_loss(kl_loss, val_batches)(),
                                  "heldout_kl": mean_loss(kl_loss, held_batches)()}
        model.train()
        kept[recipe] = [p.detach().clone() for p in diff_params]
        print(f"recipe {recipe}: {log['recipes'][recipe]}", flush=True)
    chosen = max(recipes, key=lambda r: log["recipes"][r]["val_simulated_acceptance"])
    with torch.no_grad():
        for p, b in zip(diff_params, kept[chosen]):
            p.copy_(b)
    log["chosen_recipe"] = chosen
    log["diffusion"] = log["diffusion_" + chosen]
    log["heldout_kl"] = log["recipes"][chosen]["heldout_kl"]
    log["val_block_acceptance"] = log["recipes"][chosen]["val_block_acceptance"]
    log["device"] = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    log["torch"] = torch.__version__
    log["total_seconds"] = round(time.time() - t_start, 1)
    log["params"] = {"total": sum(p.numel() for p in model.parameters()),
                     "diffusion_set": sum(p.numel() for p in diff_params)}

    # checkpoints in the published layout (two shards keep each file small); the recipe not chosen goes to a
    # subfolder, for comparison
    from orthrus_export.synthetic import write_checkpoint

    shards = max(2, math.ceil(2 * log["params"]["total"] / 12e6))  # bf16 shards of at most ~12 MB

    def save(folder):
        write_checkpoint(folder, vocab_size=VOCAB, hidden_size=a.hidden, intermediate_size=a.ffn,
                         num_layers=a.layers, num_heads=a.heads, num_kv_heads=a.kv_heads, head_dim=HEAD_DIM,
                         tie_word_embeddings=True, block_size=BLOCK, tokenizer=False, shards=shards, tensors=model.hf_state_dict(),
                         special_ids={"eos": [eot], "pad": eot, "mask": mask_id}, max_position_embeddings=4096)
    save(out)
    for recipe in recipes:
        if recipe != chosen:
            with torch.no_grad():
                for p, b in zip(diff_params, kept[recipe]):
                    p.copy_(b)
            save(out / f"recipe-{recipe}")
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        stages = [("lm", "cross-entropy (nats/token)")] + [("diffusion_" + r, "KL(AR || draft)") for r in recipes]
        fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.5))
        for ax, (name, ylabel) in zip(axes, stages):
            c, hc = log[name]["curve"], log[name]["heldout_curve"]
            ax.plot([s for s, _, _ in c], [v for _, _, v in c], label="train")
            if name == "lm":
                ax.plot([s for s, _ in hc], [v for _, v in hc], label="validation")
                ax.set_yscale("log")
            else:
                ax2 = ax.twinx()
                ax2.plot([s for s, _ in hc], [-v for _, v in hc], color="C2", label="validation block acceptance")
                ax2.set_ylabel("block acceptance (tokens/cycle)")
                ax2.legend(loc="center right")
            ax.axvline(log[name]["best_step"], color="gray", ls=":", label="kept")
            ax.legend(loc="upper right")
            ax.set_title(f"{name}: {log[name]['steps']} steps, {log[name]['seconds']:.0f} s")
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
        fig.tight_layout()
        fig.savefig(out / "loss_curves.png", dpi=110)
    except ImportError:
        print("matplotlib missing: no loss plot")
    print(json.dumps({k: v for k, v in log.items() if not k.startswith(("lm", "diffusion"))}))


if __name__ == "__main__":
    main()
