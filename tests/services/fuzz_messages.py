"""Hypothesis strategies for any protobuf request message, built from its descriptor, with values a
hostile or careless caller sends: real ids of the test's subjects and sessions beside personal
numbers, odd characters and over-long text; real images and audio beside decode bombs, truncated
and random bytes; unknown enum values, extreme and non-finite numbers."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import strategies as st

PERSONAL = ("102100099996", "11010519491231002X", "13800138000", "+8613800138000", "li.lei@example.com",
            "4111111111111111", "0044-20-7946-0958")
ODD = ("", " ", "a" * 129, "x" * 2000, "../../etc/passwd", "bank-a\x00", "' OR 1=1 --", "\u202e\u0627\u0644",
       "%s%n", "ses_" + "0" * 32, "rev_" + "f" * 32, "null", "-1", "9" * 40)
INT32 = (-(2**31), -1, 0, 1, 2, 5, 8000, 16000, 48000, 2**31 - 1)
INT64 = (-(2**63), -1, 0, 1, 1000, 10**15, 10**16, 2**63 - 1)


def message_class(descriptor: Descriptor):
    return message_factory.GetMessageClass(descriptor)


def strings(field: FieldDescriptor, pools: Mapping[str, Sequence[str]]) -> st.SearchStrategy[str]:
    """Text for a string field: the test's real values for fields of this name first."""
    known = [v for name, values in pools.items() if name in field.name for v in values]
    hostile = [st.sampled_from(PERSONAL), st.sampled_from(ODD), st.text(max_size=40)]
    # weighted towards the real values, so that whole requests get past validation often enough
    return st.one_of([st.sampled_from(known)] * 6 + hostile) if known else st.one_of(hostile)


def scalar(field: FieldDescriptor, pools: Mapping[str, Sequence[str]], payloads: Sequence[bytes]):
    t = field.type
    if t == FieldDescriptor.TYPE_STRING:
        return strings(field, pools)
    if t == FieldDescriptor.TYPE_BYTES:
        return st.one_of([st.sampled_from(list(payloads))] * 3 + [st.binary(max_size=256)])
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        values = [v.number for v in field.enum_type.values]
        return st.one_of([st.sampled_from(values)] * 3 + [st.integers(-3, 40)])  # proto3 enums are open
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32 if t == FieldDescriptor.TYPE_FLOAT
                                   else 64), st.sampled_from([0.0, -90.0, 180.5, 1e300]))
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return st.one_of(st.sampled_from(INT64), st.integers(-(2**63), 2**63 - 1))
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    return st.one_of(st.sampled_from(INT32), st.integers(-(2**31), 2**31 - 1))


def messages(descriptor: Descriptor, pools: Mapping[str, Sequence[str]], payloads: Sequence[bytes],
             depth: int = 0, max_repeated: int = 3) -> st.SearchStrategy:
    """Instances of the message ``descriptor`` with any subset of its fields set."""
    cls = message_class(descriptor)

    def field_values(field: FieldDescriptor) -> st.SearchStrategy:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            return st.dictionaries(scalar(key, pools, payloads), scalar(value, pools, payloads), max_size=3)
        if field.message_type is not None:
            one = messages(field.message_type, pools, payloads, depth + 1, max_repeated) if depth < 4 else st.just(None)
        else:
            one = scalar(field, pools, payloads)
        if field.is_repeated:
            return st.lists(one.filter(lambda v: v is not None), max_size=max_repeated)
        return one

    def build(values: dict) -> object:
        msg = cls()
        for name, value in values.items():
            field = descriptor.fields_by_name[name]
            if value is None:
                continue
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                getattr(msg, name).update(value)
            elif field.is_repeated:
                getattr(msg, name).extend(value) if field.message_type is None else \
                    [getattr(msg, name).add().CopyFrom(v) for v in value]
            elif field.message_type is not None:
                getattr(msg, name).CopyFrom(value)
            else:
                setattr(msg, name, value)
        return msg

    # A oneof takes one member (or none); any other field is set or not.
    plain = {f.name: st.one_of([field_values(f)] * 3 + [st.none()]) for f in descriptor.fields
             if f.containing_oneof is None or f.containing_oneof.name.startswith("_")}
    oneofs = [st.one_of(st.just({}), *[field_values(f).map(lambda v, n=f.name: {n: v}) for f in o.fields])  # type: ignore[misc]  # a lambda with a default
              for o in descriptor.oneofs if not o.name.startswith("_")]
    return st.tuples(st.fixed_dictionaries(plain), *oneofs).map(
        lambda parts: build({k: v for part in parts for k, v in part.items()}))


def _field_strategy(field: FieldDescriptor, pools, payloads) -> st.SearchStrategy:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        return st.dictionaries(scalar(key, pools, payloads), scalar(value, pools, payloads), max_size=3)
    one = (messages(field.message_type, pools, payloads, depth=2) if field.message_type is not None
           else scalar(field, pools, payloads))
    return st.lists(one, max_size=3) if field.is_repeated else one


def valid(descriptor: Descriptor, pools: Mapping[str, Sequence[str]], blobs: Mapping[str, Any],
          choice: Mapping[str, str] | None = None, depth: int = 0):
    """A request as a well-behaved client writes it: the test's real ids, flags on, the first
    meaningful enum value; ``blobs`` give what a field holds instead ("Image.data": a photo, or for
    a message field a message or a list of them), by "<Message>.<field>" or the field's name;
    ``choice`` picks the member of each oneof (default its first)."""
    msg = message_class(descriptor)()
    for field in descriptor.fields:
        oneof = field.containing_oneof
        if oneof is not None and not oneof.name.startswith("_") and (choice or {}).get(oneof.name,
                                                                                    oneof.fields[0].name) != field.name:
            continue
        given = blobs.get(f"{descriptor.name}.{field.name}", blobs.get(field.name))
        known = [v for name, values in pools.items() if name in field.name for v in values]
        target = getattr(msg, field.name)
        if given is not None:
            if field.message_type is None:
                setattr(msg, field.name, given)
            elif field.is_repeated:
                for item in given:
                    target.add().CopyFrom(item)
            else:
                target.CopyFrom(given)
        elif field.message_type is not None:
            if field.message_type.GetOptions().map_entry or depth > 3:
                continue
            sub = valid(field.message_type, pools, blobs, choice, depth + 1)
            target.add().CopyFrom(sub) if field.is_repeated else target.CopyFrom(sub)
        elif field.type == FieldDescriptor.TYPE_STRING and known:
            target.append(known[0]) if field.is_repeated else setattr(msg, field.name, known[0])
        elif field.type == FieldDescriptor.TYPE_BOOL and not field.is_repeated:
            setattr(msg, field.name, True)
        elif field.type == FieldDescriptor.TYPE_ENUM:
            assert field.enum_type is not None
            numbers = [v.number for v in field.enum_type.values if v.number][:1]
            if field.is_repeated:
                target.extend(numbers)
            elif numbers:
                setattr(msg, field.name, numbers[0])
    return msg


def _leaf_paths(descriptor: Descriptor, prefix: tuple = (), depth: int = 0) -> list[tuple[FieldDescriptor, ...]]:
    out = []
    for field in descriptor.fields:
        path = (*prefix, field)
        if field.message_type is not None and not field.is_repeated and depth < 3 \
                and not field.message_type.GetOptions().map_entry:
            out.extend(_leaf_paths(field.message_type, path, depth + 1))
        out.append(path)
    return out


def _mutate(base, mutations) -> object:
    msg = type(base)()
    msg.CopyFrom(base)
    for path, value in mutations:
        parent = msg
        for field in path[:-1]:
            parent = getattr(parent, field.name)
        last = path[-1]
        parent.ClearField(last.name)
        if value is None:
            continue
        if last.message_type is not None and last.message_type.GetOptions().map_entry:
            getattr(parent, last.name).update(value)
        elif last.is_repeated:
            target = getattr(parent, last.name)
            for v in value:
                target.add().CopyFrom(v) if last.message_type is not None else target.append(v)
        elif last.message_type is not None:
            getattr(parent, last.name).CopyFrom(value)
        else:
            setattr(parent, last.name, value)
    return msg


def requests(descriptor: Descriptor, pools: Mapping[str, Sequence[str]], payloads: Sequence[bytes],
             blobs: Mapping[str, Any]) -> st.SearchStrategy:
    """Mostly a well-behaved request with up to three fields made hostile (unset, or any value a
    hostile caller sends), so that requests reach decoding, models and storage; one in four wholly
    generated."""
    choices = [{o.name: f.name for o in descriptor.oneofs if f in o.fields} for f in descriptor.fields
               if f.containing_oneof is not None and not f.containing_oneof.name.startswith("_")] or [{}]
    bases = [valid(descriptor, pools, blobs, c) for c in choices]
    paths = _leaf_paths(descriptor)
    if not paths:
        return st.just(bases[0])
    mutation = st.sampled_from(paths).flatmap(
        lambda p: st.one_of(st.none(), _field_strategy(p[-1], pools, payloads)).map(lambda v, p=p: (p, v)))  # type: ignore[misc]  # a lambda with a default
    count = st.sampled_from((0, 0, 1, 1, 1, 2, 3))  # a third of them untouched, most with one bad field
    mutated = st.builds(_mutate, st.sampled_from(bases),
                        count.flatmap(lambda n: st.lists(mutation, min_size=n, max_size=n)))
    return st.one_of(mutated, mutated, mutated, messages(descriptor, pools, payloads))
