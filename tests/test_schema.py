"""Schema validation: one readable line per failure, naming the source and the field's path."""

from __future__ import annotations

import copy

import pytest
from helpers import assert_one_line

from adapterkit.adapter.config import ModuleSpec
from adapterkit.errors import SchemaValidationError
from adapterkit.schema import ADAPTER_SCHEMA, MANIFEST_SCHEMA, load_schema, validate

_DIGEST = "sha256:" + "ab" * 32


def _metadata():
    module = ModuleSpec("model.layers.0.self_attn.q_proj", "linear", 8, 16, 2.0, 32, 32)
    return {
        "format_version": 1,
        "peft_type": "LORA",
        "r": 8,
        "lora_alpha": 16,
        "use_rslora": False,
        "target_modules": ["q_proj"],
        "rank_pattern": {},
        "alpha_pattern": {},
        "task_type": "CAUSAL_LM",
        "modules": [module.to_json()],
        "num_parameters": module.num_parameters,
        "extra_tensors": [],
        "carried": [],
        "base_model": {"name": "tiny", "revision": None, "structure_digest": _DIGEST},
        "lineage": None,
        "peft_config": {"peft_type": "LORA", "r": 8},
        "safetensors_metadata": {},
    }


def _manifest():
    return {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.adapterkit.lora.v1",
        "config": {"mediaType": "application/vnd.adapterkit.lora.config.v1+json", "digest": _DIGEST, "size": 10},
        "layers": [
            {
                "mediaType": "application/vnd.adapterkit.safetensors",
                "digest": _DIGEST,
                "size": 5,
                "annotations": {"org.opencontainers.image.title": name},
            }
            for name in ("adapter_config.json", "adapter_model.safetensors")
        ],
    }


def test_valid_documents_pass():
    validate(_metadata(), ADAPTER_SCHEMA, "x")
    validate(_manifest(), MANIFEST_SCHEMA, "x")


def test_schemas_are_2020_12():
    for name in (ADAPTER_SCHEMA, MANIFEST_SCHEMA):
        assert load_schema(name)["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def _set(doc, path, value):
    target = doc
    for part in path[:-1]:
        target = target[part]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "field", "words"),
    [
        (("modules", 0, "r"), 0, "modules[0].r", "less than the minimum of 1"),
        (("modules", 0, "kind"), "conv4d", "modules[0].kind", "conv4d"),
        (("modules", 0, "in"), "32", "modules[0].in", "not of type 'integer'"),
        (("modules", 0, "surprise"), 1, "modules[0]", "surprise"),
        (("base_model", "structure_digest"), "md5:abc", "base_model.structure_digest", "does not match"),
        (("rank_pattern", "q_proj"), 0, "rank_pattern.q_proj", "minimum"),
        (("format_version",), 2, "format_version", "1 was expected"),
        (("lineage",), {"strategy": "linear"}, "lineage", "'parameters' is a required property"),
        (
            ("lineage",),
            {
                "strategy": "linear",
                "parameters": {},
                "parents": [{"digest": "x", "weight": 1}],
                "adapterkit_version": "",
            },
            "lineage.parents[0].digest",
            "does not match",
        ),
        (("safetensors_metadata", "k"), 1, "safetensors_metadata.k", "not of type 'string'"),
    ],
)
def test_metadata_errors_name_source_and_field(path, value, field, words):
    doc = _set(copy.deepcopy(_metadata()), path, value)
    with pytest.raises(SchemaValidationError) as info:
        validate(doc, ADAPTER_SCHEMA, "blobs/sha256/ab/cdef")
    error = info.value
    message = str(error)
    assert_one_line(message)
    assert message.startswith(f"blobs/sha256/ab/cdef: field '{field}': "), message
    assert words in message
    assert error.source == "blobs/sha256/ab/cdef"
    assert error.field == field
    assert len(message) <= 300


def test_missing_required_field_is_named():
    doc = _set(copy.deepcopy(_metadata()), ("modules", 0, "scaling"), _DELETE)
    with pytest.raises(SchemaValidationError, match=r"field 'modules\[0\]': 'scaling' is a required property"):
        validate(doc, ADAPTER_SCHEMA, "meta.json")
    doc = _set(copy.deepcopy(_metadata()), ("peft_config",), _DELETE)
    with pytest.raises(SchemaValidationError, match=r"^meta\.json: top level: 'peft_config' is a required property"):
        validate(doc, ADAPTER_SCHEMA, "meta.json")


def test_long_values_are_cut_to_one_short_line():
    doc = _set(copy.deepcopy(_metadata()), ("modules", 0, "kind"), "x\n" * 500)
    with pytest.raises(SchemaValidationError) as info:
        validate(doc, ADAPTER_SCHEMA, "meta.json")
    assert_one_line(str(info.value))
    assert len(str(info.value)) <= 300


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("config", "digest"), "sha256:XYZ", "config.digest"),
        (("layers", 1, "annotations", "org.opencontainers.image.title"), "../evil", "layers[1].annotations"),
        (("layers",), [], "layers"),
        (("schemaVersion",), 1, "schemaVersion"),
    ],
)
def test_manifest_errors_name_the_field(path, value, field):
    doc = _set(copy.deepcopy(_manifest()), path, value)
    with pytest.raises(SchemaValidationError) as info:
        validate(doc, MANIFEST_SCHEMA, "manifest sha256:00")
    assert_one_line(str(info.value))
    assert str(info.value).startswith("manifest sha256:00: field '")
    assert info.value.field.startswith(field), info.value.field
