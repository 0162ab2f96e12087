"""Every error adapterkit raises, in one place.

The CLI turns any :class:`AdapterkitError` into a one-line message and exit code 1, so each
message must stand on its own: name the file, the field or the reference that is at fault.

    AdapterkitError
    ├── InvalidInputError            bad input from the user, before anything is written
    │   ├── AdapterFormatError       an adapter folder, config or weights file adapterkit cannot read
    │   │   ├── UnsupportedAdapterError   a valid PEFT file of a kind adapterkit refuses (IA3, DoRA maths, ...)
    │   │   └── UnknownFormatError        no plugin registered that adapter format
    │   ├── SchemaValidationError    a document fails schemas/*.schema.json
    │   ├── InvalidReferenceError    a name, tag or digest that breaks the naming rules
    │   ├── BaseModelError           a base-model folder that cannot be fingerprinted or does not fit
    │   ├── NonFiniteError           a NaN or infinity in a tensor, or a weight whose products overflow
    │   ├── ExtractionError          a (base, fine-tuned) pair that cannot be turned into an adapter as asked
    │   ├── ExportError              an adapter the export target cannot hold exactly (GGUF and DoRA, ...)
    │   └── CompositionError         adapters that cannot be blended as asked
    │       ├── IncompatibleAdaptersError  different bases, or one module shaped differently
    │       └── UnknownStrategyError       no plugin registered that strategy
    ├── StoreError                   the local store
    │   ├── ReferenceNotFoundError   no ref, digest or prefix of that name
    │   ├── AmbiguousReferenceError  a digest prefix that matches several adapters
    │   ├── RefConflictError         a compare-and-swap ref update lost a race
    │   ├── IntegrityError           stored bytes do not match their digest or size
    │   └── StoreLockedError         a lock could not be taken in time
    ├── MergeError                   writing a merged model failed part-way (nothing was left behind)
    ├── SyncError                    push or pull failed (network, remote state, verification)
    │   ├── UnknownRemoteError       no plugin handles that URL scheme
    │   └── RemoteConflictError      the remote ref moved while pushing (another push won the race)
    └── PluginError                  a plugin failed to load or clashes with another
"""

from __future__ import annotations

__all__ = [
    "AdapterFormatError",
    "AdapterkitError",
    "AmbiguousReferenceError",
    "BaseModelError",
    "CompositionError",
    "ExtractionError",
    "ExportError",
    "IncompatibleAdaptersError",
    "IntegrityError",
    "InvalidInputError",
    "InvalidReferenceError",
    "MergeError",
    "NonFiniteError",
    "PluginError",
    "RefConflictError",
    "RemoteConflictError",
    "ReferenceNotFoundError",
    "SchemaValidationError",
    "StoreError",
    "StoreLockedError",
    "SyncError",
    "UnknownFormatError",
    "UnknownRemoteError",
    "UnknownStrategyError",
    "UnsupportedAdapterError",
]


class AdapterkitError(Exception):
    """Root of every error adapterkit raises on purpose."""


class InvalidInputError(AdapterkitError):
    """Input the user gave cannot be used; nothing was written."""


class AdapterFormatError(InvalidInputError):
    """An adapter folder, config or weights file is malformed or inconsistent."""


class UnsupportedAdapterError(AdapterFormatError):
    """A well-formed PEFT adapter of a kind adapterkit cannot represent faithfully."""


class UnknownFormatError(AdapterFormatError):
    """No registered format has that name."""


class SchemaValidationError(InvalidInputError):
    """A JSON document does not match its schema."""

    def __init__(self, message: str, *, source: str = "", field: str = "") -> None:
        super().__init__(message)
        self.source = source
        self.field = field


class InvalidReferenceError(InvalidInputError):
    """A reference (name, tag, digest) breaks the naming rules."""


class BaseModelError(InvalidInputError):
    """A base-model folder cannot be read, or an adapter does not fit it."""


class NonFiniteError(InvalidInputError):
    """A tensor holds NaN or infinity, or a weight would make a result overflow its dtype; nothing was written.

    adapterkit never stores or writes a non-finite value: one NaN in a factor spreads to every
    entry of a module's delta, and a merged model with NaN weights loads and then emits garbage.
    """


class ExtractionError(InvalidInputError):
    """A base and a fine-tuned model that cannot be turned into an adapter as asked (structure, targets, ranks)."""


class ExportError(InvalidInputError):
    """The adapter cannot be written in the format asked, exactly, with the options given; nothing was written."""


class CompositionError(InvalidInputError):
    """A blend that cannot be computed as asked (bad weights, parameters or adapters)."""


class IncompatibleAdaptersError(CompositionError):
    """Adapters for different base models, or a module shaped differently in two adapters."""


class UnknownStrategyError(CompositionError):
    """No registered strategy has this name."""


class StoreError(AdapterkitError):
    """Something about the local store itself."""


class ReferenceNotFoundError(StoreError, KeyError):
    """No adapter answers to this reference."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AmbiguousReferenceError(StoreError):
    """A digest prefix matches more than one adapter."""


class RefConflictError(StoreError):
    """A ref moved between reading it and updating it (compare-and-swap failed)."""


class IntegrityError(StoreError):
    """Stored bytes do not hash to their name, or their size is wrong."""


class StoreLockedError(StoreError):
    """A store lock could not be acquired within the timeout."""


class MergeError(AdapterkitError):
    """Writing the merged model failed part-way (disk full, base changed while read); nothing was left behind."""


class SyncError(AdapterkitError):
    """A push or pull could not complete; nothing half-written was left in the local store."""


class UnknownRemoteError(SyncError):
    """No registered remote handles this URL scheme."""


class RemoteConflictError(SyncError):
    """The remote changed between reading and writing it (a concurrent push)."""


class PluginError(AdapterkitError):
    """A plugin could not be loaded, or two plugins claim the same name."""
