"""dynprompt: train and serve dynamic-prompt classifiers over frozen transformers.

Nothing here downloads anything: backbones are local folders or packages. huggingface_hub
reads its offline switch once, when it is first imported, so a later `setdefault` (in
`load_backbone`, say) comes too late to stop a hub-named backbone from making a DNS lookup
and an HTTP attempt. Setting both switches here, in the package every entry point imports
first, makes the server, training and the library offline before any Hugging Face import.
They are defaults: `HF_HUB_OFFLINE=0` in the environment (before importing dynprompt)
lets a user who wants downloads have them.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__version__ = "0.1.0"
