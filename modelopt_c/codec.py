"""Public helpers over the native state codec: a modelopt state <-> msgpack bytes.

The format (msgpack with extension types for tuple, tensor, torch.Size, torch.dtype,
torch.device and slice) is specified in the table at the top of
``csrc/codec_wire.h``; decoding never runs code from the bytes and raises
:class:`StateDecodeError` on anything malformed.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

from ._conversion import StateDecodeError, decode_state, encode_state

__all__ = ["StateDecodeError", "dumps_state", "loads_state"]


def dumps_state(state: Any) -> bytes:
    """Encode ``state`` (e.g. ``mto.modelopt_state(model)``) as msgpack bytes.

    Tensors are stored inline (dtype, shape and raw bytes), so the bytes stand
    alone.  Raises ``TypeError`` for a value the codec cannot encode (including
    tensors with no plain byte image: DTensor/FSDP2 shards and other tensor
    subclasses, meta, nested, sparse and quantized tensors; the message says what
    to do) and ``OverflowError`` for an int outside ``-2**63 .. 2**64-1``; the
    message names the key path of the offending value.
    """
    return encode_state(state)


def loads_state(data: Any, *, source: Optional[Union[str, os.PathLike]] = None) -> Any:
    """Decode bytes written by :func:`dumps_state` back into the state.

    ``data`` is any bytes-like object (``bytes``, ``memoryview``, an ``mmap``).
    It is treated as untrusted: malformed, truncated or hostile input raises
    :class:`StateDecodeError` (a ``ValueError``) naming the byte offset, the key
    path inside the state when the failure is nested, and ``source`` (for
    instance the file name) when given.  Memory use stays proportional to the
    input's size, whatever its headers claim.
    """
    return decode_state(data, source=source)
