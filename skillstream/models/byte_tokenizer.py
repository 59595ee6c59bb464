"""A byte-level tokenizer for BDH with the part of the Hugging Face tokenizer interface that
skillstream uses (rendering, collation, evaluation, saving).

Token ids are the UTF-8 bytes of the text (vocabulary 256, as in the BDH reference). Two
control bytes that never occur in ordinary text are the special tokens:

* ``\\x04`` (End Of Transmission) is the end-of-sequence token: the chat template puts it after
  every assistant turn and text examples end with it, so a model learns where its answer stops
  and :meth:`BDHForCausalLM.generate` stops a row when it writes it.
* ``\\x00`` is the padding token. Padding never enters the loss: collation gives padded
  positions the label -100, and the model masks them out as well (see ``bdh_lm``).

Chat template. ``chat_template`` is a short marker string, not Jinja: :meth:`apply_chat_template`
renders ``role: content`` lines (the same text as the renderer's plain fallback) with EOS after
each assistant turn. Without it an answer would end with a bare newline and generation could not
tell a finished answer from a multi-line one (fenced bash blocks, worked arithmetic). Tools are
not rendered natively, so tool conversations take the renderer's documented plain rewriting.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

EOS, PAD = "\x04", "\x00"
EOS_ID, PAD_ID = ord(EOS), ord(PAD)
SPECIAL_IDS = frozenset({EOS_ID, PAD_ID})


class BatchEncoding(dict):
    """A dict of lists or tensors with attribute access and ``.to(device)`` (as HF's)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device):
        return BatchEncoding({k: v.to(device) if torch.is_tensor(v) else v for k, v in self.items()})


class ByteTokenizer:
    vocab_size = 256
    chat_template = "skillstream-bytes: role: content lines, EOS after assistant turns"
    eos_token, pad_token, bos_token, unk_token = EOS, PAD, None, None
    eos_token_id, pad_token_id, bos_token_id = EOS_ID, PAD_ID, None
    model_max_length = 1 << 30

    def __init__(self, padding_side: str = "right"):
        self.padding_side = padding_side

    def __len__(self) -> int:
        return self.vocab_size

    # -- encoding ---------------------------------------------------------------------------
    @staticmethod
    def encode(text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def __call__(self, text, padding=False, return_tensors=None, add_special_tokens: bool = True,
                 truncation: bool = False, max_length: int | None = None, **_):
        single = isinstance(text, str)
        ids = [self.encode(t) for t in ([text] if single else list(text))]
        if truncation and max_length:
            ids = [x[:max_length] for x in ids]
        masks = [[1] * len(x) for x in ids]
        if padding or return_tensors == "pt":
            width = max((len(x) for x in ids), default=0)
            if len(set(map(len, ids))) > 1 and not padding:
                raise ValueError("sequences of different lengths need padding=True to become one tensor")
            for i, x in enumerate(ids):
                fill = width - len(x)
                if self.padding_side == "left":
                    ids[i], masks[i] = [PAD_ID] * fill + x, [0] * fill + masks[i]
                else:
                    ids[i], masks[i] = x + [PAD_ID] * fill, masks[i] + [0] * fill
        if return_tensors == "pt":
            return BatchEncoding({"input_ids": torch.tensor(ids, dtype=torch.long).reshape(len(ids), -1),
                                  "attention_mask": torch.tensor(masks, dtype=torch.long).reshape(len(ids), -1)})
        if single:
            return BatchEncoding({"input_ids": ids[0], "attention_mask": masks[0]})
        return BatchEncoding({"input_ids": ids, "attention_mask": masks})

    # -- decoding ---------------------------------------------------------------------------
    def decode(self, ids, skip_special_tokens: bool = False, **_) -> str:
        if torch.is_tensor(ids):
            ids = ids.reshape(-1).tolist()
        data = bytes(int(i) for i in ids if not (skip_special_tokens and int(i) in SPECIAL_IDS))
        return data.decode("utf-8", errors="replace")

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kw) -> list[str]:
        if torch.is_tensor(sequences):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def convert_ids_to_tokens(self, ids):
        return [chr(i) for i in ids] if isinstance(ids, list) else chr(ids)

    def tokenize(self, text: str) -> list[str]:
        return [chr(b) for b in text.encode("utf-8")]

    # -- chat -------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False,
                            tools=None, **_):
        parts = []
        for m in messages:
            content = m.get("content")
            content = content if isinstance(content, str) else ("" if content is None else json.dumps(content))
            parts.append(f"{m['role']}: {content}{EOS if m['role'] == 'assistant' else ''}\n")
        text = "".join(parts) + ("assistant: " if add_generation_prompt else "")
        return self.encode(text) if tokenize else text

    # -- saving -----------------------------------------------------------------------------
    def save_pretrained(self, path) -> tuple[str]:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        f = path / "tokenizer_config.json"
        f.write_text(json.dumps({"tokenizer_class": "skillstream.models.byte_tokenizer:ByteTokenizer",
                                 "vocab_size": self.vocab_size, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
                                 "padding_side": self.padding_side}, indent=1))
        return (str(f),)

    @classmethod
    def from_pretrained(cls, path) -> "ByteTokenizer":
        cfg = json.loads((Path(path) / "tokenizer_config.json").read_text())
        return cls(padding_side=cfg.get("padding_side", "right"))
