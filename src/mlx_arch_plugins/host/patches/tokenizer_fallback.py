"""Build a tokenizer straight from ``tokenizer.json`` when transformers cannot.

Some transformers versions fail on checkpoints of architectures they do not know in
``AutoTokenizer.from_pretrained`` (an unknown ``model_type`` in the config, or a
``tokenizer_class`` such as ``TokenizersBackend`` written by a newer version).
The tokenizer itself is a plain ``tokenizers`` BPE file, so we load it with the
``tokenizers`` library and wrap it in ``PreTrainedTokenizerFast`` (which every
transformers version mlx-lm supports can build from a ``tokenizer_object``),
giving mlx-lm's ``TokenizerWrapper`` the interface it expects.

* special tokens come from ``tokenizer_config.json`` (strings or AddedToken dicts);
* the chat template comes from ``tokenizer_config.json`` or, if it has none,
  from ``chat_template.jinja`` (read as utf-8-sig);
* ``encode`` never adds BOS/EOS: the prompt string carries its own BOS;
* ``eos_token_ids`` reads the EOS id(s) of ``generation_config.json``.
"""

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

__all__ = ["load_tokenizer", "eos_token_ids", "read_json"]

_SPECIAL_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
    "mask_token",
)
# Keys of tokenizer_config.json that only steer class resolution or are rebuilt here.
_DROP_KEYS = {
    "tokenizer_class",
    "auto_map",
    "added_tokens_decoder",
    "tokenizer_file",
    "name_or_path",
}


def read_json(path: Path) -> Optional[Dict[str, Any]]:
    """Parse a JSON file if it exists; a broken file is an error naming it."""
    if not path.is_file():
        return None
    try:
        with open(path, "r", encoding="utf-8-sig") as fid:
            return json.load(fid)
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _token_text(value: Any) -> Optional[str]:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"special token must be a string or an AddedToken dict, got {value!r}")


def eos_token_ids(model_path: Union[str, Path]) -> Optional[List[int]]:
    """EOS id(s) from generation_config.json (an int or a list), or None."""
    gen = read_json(Path(model_path) / "generation_config.json") or {}
    eos = gen.get("eos_token_id")
    if eos is None:
        return None
    if isinstance(eos, int):
        return [eos]
    if isinstance(eos, list) and all(isinstance(i, int) for i in eos):
        return list(eos)
    raise ValueError(
        f"{Path(model_path) / 'generation_config.json'}: eos_token_id must be an int or "
        f"a list of ints, got {eos!r}"
    )


def load_tokenizer(model_path: Union[str, Path], **extra: Any):
    """A ``PreTrainedTokenizerFast`` built from ``tokenizer.json`` without AutoTokenizer.

    ``extra`` are the keyword arguments mlx-lm passes to ``from_pretrained``
    (e.g. ``chat_template``, ``chat_template_type``); they override the config
    and end up in ``init_kwargs`` like they would with AutoTokenizer.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    model_path = Path(model_path)
    tokenizer_file = model_path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{tokenizer_file}: missing; the fallback tokenizer needs it")
    try:
        backend = Tokenizer.from_file(str(tokenizer_file))
    except Exception as e:
        raise ValueError(f"{tokenizer_file}: the tokenizers library cannot load it ({e})") from e

    config = read_json(model_path / "tokenizer_config.json") or {}
    kwargs: Dict[str, Any] = {k: v for k, v in config.items() if k not in _DROP_KEYS}
    for key in _SPECIAL_KEYS:
        if key in kwargs:
            kwargs[key] = _token_text(kwargs[key])
    extra = {k: v for k, v in extra.items() if k not in ("trust_remote_code", "revision")}
    kwargs.update(extra)

    # No tokenizer_config.json (or no BOS/EOS in it): name them from the ids in
    # generation_config.json / config.json.
    ids = {}
    for name in ("config.json", "generation_config.json"):
        ids.update(
            {
                k: v
                for k, v in (read_json(model_path / name) or {}).items()
                if k in ("bos_token_id", "eos_token_id") and v is not None
            }
        )
    for key in ("bos_token", "eos_token"):
        token_id = ids.get(key + "_id")
        if isinstance(token_id, list):
            token_id = token_id[0] if token_id else None
        if kwargs.get(key) is None and isinstance(token_id, int):
            kwargs[key] = backend.id_to_token(token_id)

    if not kwargs.get("chat_template"):
        jinja = model_path / "chat_template.jinja"
        if jinja.is_file():
            kwargs["chat_template"] = jinja.read_text(encoding="utf-8-sig")

    # The prompt string carries BOS itself; encode must not add special tokens.
    kwargs["add_bos_token"] = False
    kwargs["add_eos_token"] = False
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    tokenizer.name_or_path = str(model_path)
    return tokenizer
