"""The Hugging Face Hub remote (``hf://org/repo[@revision]``), registered through the ``adapterkit`` entry points."""
