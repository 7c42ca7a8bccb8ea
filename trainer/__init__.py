"""memtrain: fine-tune Stable Diffusion models without memorizing their training data."""

import logging

__version__ = "0.1.0"


class _TorchvisionFallbackNotice(logging.Filter):
    """Drops the one notice transformers 5 logs when diffusers imports its image processors without
    torchvision ("... requires torchvision (not installed); falling back to ...Pil"): memtrain only uses
    the PIL processors, so the notice tells users nothing. Every other transformers message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackNotice())
