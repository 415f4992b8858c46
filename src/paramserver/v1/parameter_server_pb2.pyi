from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT16: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT64: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_INT64: DType
DTYPE_INT32: DType
DTYPE_INT16: DType
DTYPE_INT8: DType
DTYPE_UINT8: DType
DTYPE_BOOL: DType

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class RegisterClientRequest(_message.Message):
    __slots__ = ("client_name", "tensors")
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    client_name: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, client_name: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class RegisterClientResponse(_message.Message):
    __slots__ = ("client_id", "first_round", "total_rounds", "clients", "tensors", "model_round", "max_unary_payload", "min_clients", "round_timeout", "assigns_rounds", "config", "strategy", "secagg")
    class ConfigEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ROUND_FIELD_NUMBER: _ClassVar[int]
    MAX_UNARY_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    MIN_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    ROUND_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    ASSIGNS_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    SECAGG_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    first_round: int
    total_rounds: int
    clients: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    model_round: int
    max_unary_payload: int
    min_clients: int
    round_timeout: float
    assigns_rounds: bool
    config: _containers.ScalarMap[str, float]
    strategy: str
    secagg: SecAggSettings
    def __init__(self, client_id: _Optional[str] = ..., first_round: _Optional[int] = ..., total_rounds: _Optional[int] = ..., clients: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., model_round: _Optional[int] = ..., max_unary_payload: _Optional[int] = ..., min_clients: _Optional[int] = ..., round_timeout: _Optional[float] = ..., assigns_rounds: _Optional[bool] = ..., config: _Optional[_Mapping[str, float]] = ..., strategy: _Optional[str] = ..., secagg: _Optional[_Union[SecAggSettings, _Mapping]] = ...) -> None: ...

class SecAggSettings(_message.Message):
    __slots__ = ("bits", "frac_bits", "clip", "neighbours")
    BITS_FIELD_NUMBER: _ClassVar[int]
    FRAC_BITS_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    bits: int
    frac_bits: int
    clip: float
    neighbours: int
    def __init__(self, bits: _Optional[int] = ..., frac_bits: _Optional[int] = ..., clip: _Optional[float] = ..., neighbours: _Optional[int] = ...) -> None: ...

class SecAggClientMessage(_message.Message):
    __slots__ = ("advertise", "shares", "confirm", "reveal")
    ADVERTISE_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    CONFIRM_FIELD_NUMBER: _ClassVar[int]
    REVEAL_FIELD_NUMBER: _ClassVar[int]
    advertise: SecAggAdvertise
    shares: SecAggShares
    confirm: SecAggConfirm
    reveal: SecAggReveal
    def __init__(self, advertise: _Optional[_Union[SecAggAdvertise, _Mapping]] = ..., shares: _Optional[_Union[SecAggShares, _Mapping]] = ..., confirm: _Optional[_Union[SecAggConfirm, _Mapping]] = ..., reveal: _Optional[_Union[SecAggReveal, _Mapping]] = ...) -> None: ...

class SecAggServerMessage(_message.Message):
    __slots__ = ("roster", "delivered", "survivors", "included", "done")
    ROSTER_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    INCLUDED_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    roster: SecAggRoster
    delivered: SecAggDelivered
    survivors: SecAggNames
    included: SecAggIncluded
    done: SecAggDone
    def __init__(self, roster: _Optional[_Union[SecAggRoster, _Mapping]] = ..., delivered: _Optional[_Union[SecAggDelivered, _Mapping]] = ..., survivors: _Optional[_Union[SecAggNames, _Mapping]] = ..., included: _Optional[_Union[SecAggIncluded, _Mapping]] = ..., done: _Optional[_Union[SecAggDone, _Mapping]] = ...) -> None: ...

class SecAggAdvertise(_message.Message):
    __slots__ = ("client_id", "round", "c_public_key", "s_public_key")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    C_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    S_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    round: int
    c_public_key: bytes
    s_public_key: bytes
    def __init__(self, client_id: _Optional[str] = ..., round: _Optional[int] = ..., c_public_key: _Optional[bytes] = ..., s_public_key: _Optional[bytes] = ...) -> None: ...

class SecAggRosterEntry(_message.Message):
    __slots__ = ("client_id", "c_public_key", "s_public_key")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    C_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    S_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    c_public_key: bytes
    s_public_key: bytes
    def __init__(self, client_id: _Optional[str] = ..., c_public_key: _Optional[bytes] = ..., s_public_key: _Optional[bytes] = ...) -> None: ...

class SecAggRoster(_message.Message):
    __slots__ = ("clients", "threshold", "context", "graph_seed")
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    GRAPH_SEED_FIELD_NUMBER: _ClassVar[int]
    clients: _containers.RepeatedCompositeFieldContainer[SecAggRosterEntry]
    threshold: int
    context: bytes
    graph_seed: bytes
    def __init__(self, clients: _Optional[_Iterable[_Union[SecAggRosterEntry, _Mapping]]] = ..., threshold: _Optional[int] = ..., context: _Optional[bytes] = ..., graph_seed: _Optional[bytes] = ...) -> None: ...

class SecAggShares(_message.Message):
    __slots__ = ("ciphertexts",)
    class CiphertextsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    ciphertexts: _containers.ScalarMap[str, bytes]
    def __init__(self, ciphertexts: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class SecAggDelivered(_message.Message):
    __slots__ = ("ciphertexts",)
    class CiphertextsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    ciphertexts: _containers.ScalarMap[str, bytes]
    def __init__(self, ciphertexts: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class SecAggNames(_message.Message):
    __slots__ = ("client_ids",)
    CLIENT_IDS_FIELD_NUMBER: _ClassVar[int]
    client_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, client_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class SecAggConfirm(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SecAggIncluded(_message.Message):
    __slots__ = ("included", "dropped")
    INCLUDED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    included: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, included: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[str]] = ...) -> None: ...

class SecAggReveal(_message.Message):
    __slots__ = ("self_mask_shares", "key_shares")
    class SelfMaskSharesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    class KeySharesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    SELF_MASK_SHARES_FIELD_NUMBER: _ClassVar[int]
    KEY_SHARES_FIELD_NUMBER: _ClassVar[int]
    self_mask_shares: _containers.ScalarMap[str, bytes]
    key_shares: _containers.ScalarMap[str, bytes]
    def __init__(self, self_mask_shares: _Optional[_Mapping[str, bytes]] = ..., key_shares: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class SecAggDone(_message.Message):
    __slots__ = ("num_updates", "total_examples")
    NUM_UPDATES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    num_updates: int
    total_examples: int
    def __init__(self, num_updates: _Optional[int] = ..., total_examples: _Optional[int] = ...) -> None: ...

class NextRoundRequest(_message.Message):
    __slots__ = ("client_id", "after_round")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_ROUND_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    after_round: int
    def __init__(self, client_id: _Optional[str] = ..., after_round: _Optional[int] = ...) -> None: ...

class RoundAssignment(_message.Message):
    __slots__ = ("role", "round", "model_round", "config", "evaluate_round")
    class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ROLE_UNSPECIFIED: _ClassVar[RoundAssignment.Role]
        TRAIN: _ClassVar[RoundAssignment.Role]
        WAIT: _ClassVar[RoundAssignment.Role]
        FINISHED: _ClassVar[RoundAssignment.Role]
    ROLE_UNSPECIFIED: RoundAssignment.Role
    TRAIN: RoundAssignment.Role
    WAIT: RoundAssignment.Role
    FINISHED: RoundAssignment.Role
    class ConfigEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_ROUND_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_ROUND_FIELD_NUMBER: _ClassVar[int]
    role: RoundAssignment.Role
    round: int
    model_round: int
    config: _containers.ScalarMap[str, float]
    evaluate_round: int
    def __init__(self, role: _Optional[_Union[RoundAssignment.Role, str]] = ..., round: _Optional[int] = ..., model_round: _Optional[int] = ..., config: _Optional[_Mapping[str, float]] = ..., evaluate_round: _Optional[int] = ...) -> None: ...

class EvaluationReport(_message.Message):
    __slots__ = ("client_id", "round", "num_examples", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    round: int
    num_examples: int
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, client_id: _Optional[str] = ..., round: _Optional[int] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class EvaluationAck(_message.Message):
    __slots__ = ("counted",)
    COUNTED_FIELD_NUMBER: _ClassVar[int]
    counted: bool
    def __init__(self, counted: _Optional[bool] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("client_id", "round", "num_examples", "tensors", "sha256", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    round: int
    num_examples: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    sha256: bytes
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, client_id: _Optional[str] = ..., round: _Optional[int] = ..., num_examples: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., sha256: _Optional[bytes] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class SendUpdateRequest(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SendUpdateResponse(_message.Message):
    __slots__ = ("round", "duplicate", "received", "expected")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    round: int
    duplicate: bool
    received: int
    expected: int
    def __init__(self, round: _Optional[int] = ..., duplicate: _Optional[bool] = ..., received: _Optional[int] = ..., expected: _Optional[int] = ...) -> None: ...

class GetAveragedModelRequest(_message.Message):
    __slots__ = ("client_id", "round")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    round: int
    def __init__(self, client_id: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class ModelHeader(_message.Message):
    __slots__ = ("round", "tensors", "sha256", "num_updates", "total_examples", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    NUM_UPDATES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    round: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    sha256: bytes
    num_updates: int
    total_examples: int
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, round: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., sha256: _Optional[bytes] = ..., num_updates: _Optional[int] = ..., total_examples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class GetAveragedModelResponse(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ModelHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[ModelHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UpdateMessage(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ModelMessage(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ModelHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[ModelHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...
