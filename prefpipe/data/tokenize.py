"""Tokenizing preference records into the id columns both phases consume.

Rules, recorded in the cache metadata so a mismatch is detectable:

- **Boundary: separate, each response in context.** The prompt and each response are tokenized on their own and
  their ids concatenated, so the chosen and rejected sequences share exactly the same prompt ids and "the response
  tokens" are well defined. A prompt that ends in a space keeps that space in its own last token (joint
  tokenization could merge it into the response's first token). The response's ids are those of the response
  *in context*, not of the response as the first text of a document: tokenizers whose normalizer or pre-tokenizer
  marks the start of a text (SentencePiece-style "▁" prepending: Llama 2, Mistral, Phi-3, TinyLlama; Metaspace
  with ``prepend_scheme`` "first" or "always") would otherwise give every response a leading "▁", a space that is
  not in the text. Such tokenizers are detected once (`context_anchors`), and their responses are tokenized after
  a short anchor text whose ids are then removed, so ``decode(prompt_ids + response_ids) == prompt + response``.
  Byte-level BPE and WordPiece-style tokenizers mark nothing and are tokenized plainly.
- **BOS once.** Texts are tokenized with ``add_special_tokens=False``; the tokenizer's own leading special ids
  (its BOS, if it adds one) are then prepended to the prompt unless the text already produced them, as a chat
  template that writes ``{{ bos_token }}`` does (Llama 3's ``<|begin_of_text|>``, Gemma's ``<bos>``, Mistral's
  ``<s>``, while their post-processors add the same BOS to a plain call) or a plain-text prompt that starts with
  the BOS text. A tokenizer with no BOS (Qwen) gets nothing prepended.
- **EOS.** Plain-text responses get the EOS id appended, so the model learns to stop, unless the text already ends
  with it. Conversational responses are rendered with the chat template, which writes its own end-of-turn token;
  nothing is appended, also when the EOS differs from that token (Gemma's ``<eos>`` vs ``<end_of_turn>``).
- **Chat rendering.** Templates are rendered with one recorded date (`TokenizeSettings.chat_date`) passed as
  ``date_string`` and behind ``strftime_now``, so a Llama 3.x template's "Today Date" line does not change with
  the day of the run; the date is part of the tokenization metadata and so of the cache identity. The prompt is ``apply_chat_template(prompt, add_generation_prompt=True)``, so it ends with
  the assistant header; a response is the text that ``apply_chat_template(prompt + response)`` adds after that
  prefix, so it starts with the assistant's text. A template that refuses a row (for example
  ``raise_exception('System role not supported')`` on a system message) stops the run with a `UserError` naming
  the file, row and the template's own message: the row is the user's to fix or drop.
- **End of turn.** The response keeps everything the template writes after the assistant's text, including what
  follows its end-of-turn token: the ``"\n"`` after Gemma's ``<end_of_turn>`` and ChatML's ``<|im_end|>`` is the
  last response token. Prompt + response text is then exactly the template's rendering of the whole
  conversation, the form the SFT model was trained on, as TRL and OpenRLHF also split it; that token is
  near-certain after the end-of-turn token, so it adds next to nothing to a log-ratio.
- **Prefix consistency.** A template that renders the prompt differently once a response follows cannot be
  split, and a row where that happens stops the run with a `UserError` (file, row, response column, where the
  two renderings part). Real cases: Mistral v0.3 puts the system message into the *last* user turn, so it
  vanishes once the answer follows; DeepSeek-R1-style templates open ``<think>`` in the generation prompt but
  not in a rendered answer. The fix is a template that renders every prefix the same way, or plain-text data
  pre-rendered by the user.
- **Truncation.** With ``max_length`` (total) and ``max_prompt_length``: the prompt is cut from the left to
  ``max_prompt_length`` (keeping its leading BOS), then each response from the right to fit ``max_length``.
- **Skips** (counted, never silent): an empty response text, ``chosen == rejected``, and a prompt with no tokens
  at all. An empty prompt text is kept when the tokenizer has a BOS: its prompt is that BOS alone, which gives
  the first response token a context to be scored in. Only with a tokenizer that adds no BOS is an empty prompt
  skipped (reason ``empty_prompt``). Because ``max_prompt_length < max_length``, every response keeps at least
  one token after truncation. Duplicate rows (same content) are counted but kept: repeating a pair is a
  legitimate way to weight it. What "same content" means, and what counting costs, is `SeenHashes`'s docstring.
"""

from __future__ import annotations

import datetime
import hashlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any
from collections.abc import Sequence

from prefpipe.data.formats import Record
from prefpipe.errors import UserError
from prefpipe.options import OptionError, opt

BOUNDARY_RULE = "separate, responses in context"
# Anchor texts tried in turn; the first whose ids stay a prefix of the anchored response wins (see
# `PairTokenizer._encode_responses`). A newline rarely merges with what follows; "a" covers responses that start
# with whitespace, which a newline may merge with.
ANCHORS = ("\n", "a", "1")
DEFAULT_CHAT_DATE = "2024-07-26"
SKIP_REASONS = {
    "empty_response": "a response is empty text",
    "chosen_equals_rejected": "chosen and rejected are identical",
    "empty_prompt": "the prompt is empty and the tokenizer adds no BOS (the first response token would have "
                    "no context)",
}


@dataclass(frozen=True)
class TokenizeSettings:
    """`--max_length` and `--max_prompt_length`. The prompt budget defaults to half the total (512 of 1024) and
    is resolved here, so the cache metadata always records the integer that was used."""
    max_length: int = opt(1024, help="Total token budget per sequence; longer responses lose their end.")
    max_prompt_length: int | None = opt(None, help="Prompt token budget; longer prompts lose their beginning.",
                                        default_text="max_length // 2")
    chat_date: str = opt(DEFAULT_CHAT_DATE, metavar="YYYY-MM-DD",
                         help="The date chat templates render (Llama 3.x's 'Today Date' line): fixed, so the ids do "
                              "not depend on the day of the run. Part of the cache identity.")

    def __post_init__(self):
        try:
            datetime.date.fromisoformat(self.chat_date)
        except (TypeError, ValueError):
            raise OptionError(self, ("chat_date",), f"{{}} must be a date as YYYY-MM-DD (got {self.chat_date!r})")
        if self.max_length < 2:
            raise OptionError(self, ("max_length",), f"{{}} must be >= 2 (got {self.max_length})")
        if self.max_prompt_length is None:
            object.__setattr__(self, "max_prompt_length", self.max_length // 2)
        if self.max_prompt_length < 1:
            raise OptionError(self, ("max_prompt_length",), f"{{}} must be >= 1 (got {self.max_prompt_length})")
        if self.max_prompt_length >= self.max_length:
            raise OptionError(self, ("max_prompt_length", "max_length"),
                              f"{{}} ({self.max_prompt_length}) must be smaller than {{}} ({self.max_length}), "
                              "or no response token would fit")

    def metadata(self) -> dict:
        return {**asdict(self), "boundary": BOUNDARY_RULE, "bos": "once", "eos": "plain-text responses",
                "truncation": "prompt left (keep BOS), responses right"}


class SeenHashes:
    """The content hashes of every row counted so far, for the duplicate count, in 8 bytes a row.

    A row repeats an earlier one when their `Record.content_hash` values are equal (the reader's: the first 64 bits
    of a sha256 of the row's normalised content). Each value is kept as a 64-bit key hashed from it, so the count
    is exact up to a hash collision: two different rows share a key with probability about n^2 / 2^64 over n rows
    (about 5e-8 at a million rows), in which case one of them is counted as a duplicate it is not.

    The hashes are kept as one sorted numpy uint64 array rather than a set of strings (about 100 bytes a row, 100 MB
    at a million rows): 8 MB at a million rows. Adding a block merges it in, O(rows so far) per block."""

    def __init__(self):
        import numpy as np
        self._np = np
        self._sorted = np.empty(0, dtype=np.uint64)

    def __len__(self) -> int:
        return len(self._sorted)

    @staticmethod
    def _key(h: str) -> int:
        # 64 bits of a hash of the string, whatever it holds (the reader's 16 hex digits, or a hand-built
        # Record's own value): equal strings give equal keys, different ones collide as rarely as said above.
        return int.from_bytes(hashlib.blake2b(h.encode(), digest_size=8).digest(), "big")

    def add(self, hashes: Sequence[str]) -> int:
        """Add `hashes` (one per row, in row order); return how many of those rows repeat an earlier row, earlier
        in `hashes` or added before."""
        np = self._np
        if not len(hashes):
            return 0
        keys = np.unique(np.fromiter(map(self._key, hashes), dtype=np.uint64, count=len(hashes)))
        at = np.searchsorted(self._sorted, keys)
        known = np.zeros(len(keys), dtype=bool)
        inside = at < len(self._sorted)
        known[inside] = self._sorted[at[inside]] == keys[inside]
        self._sorted = np.insert(self._sorted, at[~known], keys[~known])
        return len(hashes) - int((~known).sum())


@dataclass
class TokenStats:
    """What tokenization did to the rows, for `data check` and the precompute summary."""
    rows_read: int = 0
    rows_kept: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0
    duplicates: int = 0
    skipped: Counter = field(default_factory=Counter)
    skip_records: list = field(default_factory=list)  # {row_id, source, row, reason}
    # column -> Counter {token count: kept rows with it}: a histogram, so `data check` holds one entry per distinct
    # length (at most max_length), not one per row.
    lengths: dict = field(default_factory=dict)
    keep_lengths: bool = False
    _seen: SeenHashes = field(default_factory=SeenHashes, repr=False)

    def to_dict(self) -> dict:
        return {"rows_read": self.rows_read, "rows_kept": self.rows_kept,
                "rows_skipped": sum(self.skipped.values()), "skipped": dict(self.skipped),
                "prompt_truncated": self.prompt_truncated, "response_truncated": self.response_truncated,
                "duplicates": self.duplicates}


def chat_template_kwargs(chat_date: str) -> dict:
    """What every chat-template rendering gets, so that a template that prints a date prints `chat_date`:
    ``date_string``, the variable Llama 3.x templates read before they ask the clock, in their "%d %b %Y" form.
    (transformers passes template variables as plain data, so the clock itself, ``strftime_now``, cannot be
    replaced; `check_template_date` refuses templates that read it directly.)"""
    day = datetime.date.fromisoformat(chat_date)
    months = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
    return {"date_string": f"{day.day:02d} {months[day.month - 1]} {day.year}"}  # %b without the locale


def check_template_date(template: str | None) -> None:
    """Refuse a chat template that writes today's date without reading ``date_string``: its ids would change with
    the day of the run while nothing in the cache identity does."""
    if template and "strftime_now" in template and "date_string" not in template:
        raise UserError("the chat template reads today's date (strftime_now) and does not take date_string, so "
                        "the token ids would depend on the day of the run; edit the template to print "
                        "date_string (prefpipe passes --chat_date as date_string), or pre-render the data as "
                        "plain text")


def context_anchors(tok) -> list[tuple[str, list[int]]]:
    """The anchors (text, ids) after which this tokenizer's responses are tokenized, or [] when it tokenizes a text
    the same at the start of a document as after other text (byte-level BPE, WordPiece-style), so that plain
    tokenization already gives the ids in context.

    Detection: a probe word tokenized alone and after an anchor (anchor ids removed) differ exactly when the
    tokenizer marks the start of a text, as SentencePiece-style normalizers that prepend "▁" do."""
    def ids(text):
        return list(tok(text, add_special_tokens=False)["input_ids"])

    anchors = [(a, ids(a)) for a in ANCHORS]
    for probe in ("Natalia", "x", "The"):
        for a, a_ids in anchors:
            joined = ids(a + probe)
            if joined[:len(a_ids)] == a_ids:
                if joined[len(a_ids):] != ids(probe):
                    return anchors
                break
    return []


def _not_an_extension(prompt: str, full: str) -> str:
    """One line saying where the two renderings part and what the user can do about it."""
    i = next((k for k, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
    return (f"the chat template does not render prompt + response as an extension of the prompt with its generation "
            f"prompt (from character {i} the prompt renders as {prompt[i:i + 40]!r} but prompt + response as "
            f"{full[i:i + 40]!r}), so the response cannot be separated from the prompt; use a chat template that "
            f"renders every prefix of a conversation the same way, or pre-render the data as plain text (prompt: the "
            f"conversation as the model should see it, ending with the assistant header; chosen/rejected: each "
            f"answer followed by the end-of-turn token)")


class PairTokenizer:
    """Applies the module's rules with one Hugging Face tokenizer."""

    def __init__(self, tokenizer, settings: TokenizeSettings = TokenizeSettings()):
        self.tok = tokenizer
        self.settings = settings
        probe_with = tokenizer("a", add_special_tokens=True)["input_ids"]
        probe_without = tokenizer("a", add_special_tokens=False)["input_ids"]
        cut = len(probe_with) - len(probe_without)
        # Only a prefix counts: tokenizers that append EOS on their own do not get it on prompts.
        self.prefix = list(probe_with[:cut]) if cut > 0 and probe_with[cut:] == probe_without else []
        if not self.prefix:
            for i in range(len(probe_with)):
                if probe_with[i:i + len(probe_without)] == probe_without:
                    self.prefix = list(probe_with[:i])
                    break
        self.eos = tokenizer.eos_token_id
        self.anchors = context_anchors(tokenizer)
        self.template_kwargs = chat_template_kwargs(settings.chat_date)
        check_template_date(getattr(tokenizer, "chat_template", None))

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(x) for x in self.tok(texts, add_special_tokens=False)["input_ids"]]

    def _encode_responses(self, texts: list[str]) -> list[list[int]]:
        """Response ids in context (module docstring): plain for tokenizers that mark nothing at the start of a
        text; otherwise each text after the first anchor whose ids stay a prefix of the result (an anchor can merge
        with a response's first characters; the next one is tried), the anchor's ids removed."""
        if not self.anchors:
            return self._encode(texts)
        out: list = [None] * len(texts)
        todo = list(range(len(texts)))
        for a, a_ids in self.anchors:
            joined = self._encode([a + texts[i] for i in todo])
            left = []
            for i, ids in zip(todo, joined):
                if ids[:len(a_ids)] == a_ids:
                    out[i] = ids[len(a_ids):]
                else:
                    left.append(i)
            todo = left
            if not todo:
                break
        for i, ids in zip(todo, self._encode([texts[i] for i in todo])):
            out[i] = ids  # every anchor merged: the text's own tokenization, the best left
        return out

    def encode_prompts(self, texts: list[str]) -> list[list[int]]:
        """Prompt ids by the BOS-once rule, untruncated: what generation and the demo's SFT feed the model."""
        return [ids if ids[:len(self.prefix)] == self.prefix else self.prefix + ids for ids in self._encode(texts)]

    def _render(self, prompt: Any, responses: list[Any], rec: Record, cols: list[str]) -> tuple[str, list[str]]:
        if isinstance(prompt, str):
            return prompt, list(responses)
        if not getattr(self.tok, "chat_template", None):
            raise UserError("conversational data needs a tokenizer with a chat template; this one has none",
                            file=rec.source, row=rec.row, column=cols[0])
        p = self._apply_template(prompt, rec, cols[0], add_generation_prompt=True)
        out = []
        for resp, col in zip(responses, cols[1:]):
            full = self._apply_template(prompt + resp, rec, col)
            if not full.startswith(p):
                raise UserError(_not_an_extension(p, full), file=rec.source, row=rec.row, column=col)
            out.append(full[len(p):])
        return p, out

    def _apply_template(self, messages: list[dict], rec: Record, col: str, **kwargs) -> str:
        try:
            return self.tok.apply_chat_template(messages, tokenize=False, **self.template_kwargs, **kwargs)
        except Exception as e:  # noqa: BLE001 - the model's own Jinja code run on the user's messages
            # Templates refuse rows on purpose (raise_exception) or fail on shapes they do not expect; either way
            # the fix is in the data or the template, so the user gets the template's message, not a traceback.
            msg = " ".join(str(e).split()) or type(e).__name__
            raise UserError(f"the chat template failed on this row: {msg}", file=rec.source, row=rec.row,
                            column=col) from e

    def _truncate_prompt(self, ids: list[int]) -> tuple[list[int], bool]:
        limit = self.settings.max_prompt_length
        if len(ids) <= limit:
            return ids, False
        head = self.prefix if ids[:len(self.prefix)] == self.prefix and len(self.prefix) < limit else []
        return head + ids[len(ids) - (limit - len(head)):], True

    def tokenize(self, records: list[Record], stats: TokenStats, paired: bool) -> dict[str, list]:
        """Tokenize a batch of records into columns; skipped rows are counted in `stats`."""
        resp_fields = ("chosen", "rejected") if paired else ("completion",)
        out: dict[str, list] = {"row_id": [], "prompt_ids": [], **{f"{f}_ids": [] for f in resp_fields}}
        if not paired:
            out["label"] = []
        texts: list[tuple[Record, str, list[str]]] = []
        stats.duplicates += stats._seen.add([rec.content_hash for rec in records])
        for rec in records:
            stats.rows_read += 1
            responses = [getattr(rec, f) for f in resp_fields]
            reason = None
            if any((r == "" or r == []) for r in responses):
                reason = "empty_response"
            elif paired and (responses[0] == responses[1] if rec.ids is None else
                             rec.ids["chosen"] == rec.ids["rejected"]):
                reason = "chosen_equals_rejected"
            if reason:
                self._skip(stats, rec, reason)
                continue
            if rec.ids is None:
                p, rs = self._render(rec.prompt, responses, rec, ["prompt", *resp_fields])
                texts.append((rec, p, rs))
            else:
                texts.append((rec, None, None))

        prompt_ids, resp_ids = self._ids(texts, resp_fields)
        L = self.settings.max_length
        for i, (rec, _, _) in enumerate(texts):
            pids = prompt_ids[i]
            if not pids:
                self._skip(stats, rec, "empty_prompt")
                continue
            pids, p_cut = self._truncate_prompt(pids)
            budget = L - len(pids)
            rids, r_cut = [], False
            for k in range(len(resp_fields)):
                ids = resp_ids[k][i]
                # Sampled ids are what the model produced: a completion cut by max_new_tokens gets no EOS.
                if rec.ids is None and isinstance(getattr(rec, resp_fields[k]), str) and self.eos is not None and \
                        (not ids or ids[-1] != self.eos):
                    ids = ids + [self.eos]
                if len(ids) > budget:
                    ids, r_cut = ids[:budget], True
                rids.append(ids)
            if not all(rids):  # non-empty text that tokenizes to nothing (a tokenizer that drops it)
                self._skip(stats, rec, "empty_response")
                continue
            stats.prompt_truncated += p_cut
            stats.response_truncated += r_cut
            stats.rows_kept += 1
            out["row_id"].append(rec.row_id)
            out["prompt_ids"].append(pids)
            for f, ids in zip(resp_fields, rids):
                out[f"{f}_ids"].append(ids)
            if not paired:
                out["label"].append(rec.label)
            if stats.keep_lengths:
                for name, n in (("prompt", len(pids)), *((f, len(r)) for f, r in zip(resp_fields, rids))):
                    stats.lengths.setdefault(name, Counter())[n] += 1
        return out

    def _ids(self, texts: list, resp_fields: tuple) -> tuple[list, list]:
        """Prompt ids and, per response field, response ids of `texts` ((record, prompt text, response texts));
        a record that brings its ids (`Record.ids`) keeps them, the rest are encoded by the module's rules."""
        todo = [i for i, (rec, _, _) in enumerate(texts) if rec.ids is None]
        enc_p = self.encode_prompts([texts[i][1] for i in todo])
        enc_r = [self._encode_responses([texts[i][2][k] for i in todo]) for k in range(len(resp_fields))]
        prompt_ids = [list(rec.ids["prompt"]) if rec.ids is not None else None for rec, _, _ in texts]
        resp_ids = [[list(rec.ids[f]) if rec.ids is not None else None for rec, _, _ in texts] for f in resp_fields]
        for j, i in enumerate(todo):
            prompt_ids[i] = enc_p[j]
            for k in range(len(resp_fields)):
                resp_ids[k][i] = enc_r[k][j]
        return prompt_ids, resp_ids

    def prompt_ids(self, records: list[Record]) -> list[list[int]]:
        """The prompt ids a cache of these records would hold (rendered, BOS once, cut to `max_prompt_length`):
        what generation samples from, so that a sample's prompt is the cached prompt."""
        texts = [self._render(rec.prompt, [], rec, ["prompt"])[0] for rec in records]
        return [self._truncate_prompt(ids)[0] for ids in self.encode_prompts(texts)]

    @staticmethod
    def _skip(stats: TokenStats, rec: Record, reason: str):
        stats.skipped[reason] += 1
        stats.skip_records.append({"row_id": rec.row_id, "source": rec.source, "row": rec.row, "reason": reason})
