"""Qwen2-VL and InternVL processors in a process without torchvision (this machine: see the Makefile).

transformers 5 gives both processors a required video processor, and every video processor needs torchvision:
without it even building a processor fails ("VIDEO_PROCESSOR_MAPPING has no attribute '_extra_content'"), and
loading a saved one goes through AutoVideoProcessor, a torchvision-only stub. The project only ever sends
images, so `enable_videoless_processors` puts a stand-in in the video slot that keeps the real one's settings
and refuses videos. `load_vlm` calls it; where torchvision is installed (a GPU machine) it does nothing and the
real video processors load from the same files.
"""

from __future__ import annotations

from typing import Any

from transformers.utils import is_torchvision_available


def _video_processor_base():
    from transformers.video_processing_utils import VideoProcessorMixin

    return VideoProcessorMixin


class VideolessVideoProcessor(_video_processor_base()):
    """Holds a family's video-processor slot where torchvision is missing: it saves the settings of the real
    video processor it `stands_for` (so a torchvision install loads that one from the same folder) and refuses
    videos. This project only ever sends images."""

    _input_names = {
        "Qwen2VLVideoProcessor": ["pixel_values_videos", "video_grid_thw"],
        "InternVLVideoProcessor": ["pixel_values_videos"],
    }

    def __init__(self, stands_for: str = "Qwen2VLVideoProcessor", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stands_for = stands_for
        self.model_input_names = list(self._input_names.get(stands_for, ["pixel_values_videos"]))

    def preprocess(self, videos: Any, **kwargs: Any):
        raise NotImplementedError(
            f"videos need {self.stands_for}, which needs torchvision; this process has none (models/videoless.py)"
        )

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output.pop("model_input_names", None)
        output["video_processor_type"] = output.pop("stands_for")
        return output

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> VideolessVideoProcessor:
        from transformers.video_processing_utils import BaseVideoProcessor

        # BaseVideoProcessor only reads the files here (processor_config.json's "video_processor", or the older
        # video_preprocessor_config.json); building one would need torchvision.
        kwargs.pop("trust_remote_code", None)
        settings, _ = BaseVideoProcessor.get_video_processor_dict(pretrained_model_name_or_path, **kwargs)
        settings = dict(settings)
        stands_for = settings.pop("video_processor_type", None) or "Qwen2VLVideoProcessor"
        return cls(stands_for=stands_for, **settings)


def enable_videoless_processors() -> None:
    """Let Qwen2VLProcessor / InternVLProcessor be built and loaded in a process without torchvision.

    transformers 5 gives both a required `video_processor` and (a) checks it against `VideoProcessorMixin`, which
    the top-level package does not export without torchvision, so even constructing the processor fails with
    "VIDEO_PROCESSOR_MAPPING has no attribute '_extra_content'", and (b) loads it with AutoVideoProcessor, a
    torchvision-only dummy. This resolves the base class for the check and routes the video slot of
    `ProcessorMixin.from_pretrained` to `VideolessVideoProcessor`. Process-wide and idempotent; a no-op where
    torchvision is installed, where the real video processors load."""
    if is_torchvision_available():
        return
    from transformers import processing_utils

    if not hasattr(processing_utils.transformers_module, "VideoProcessorMixin"):
        processing_utils.transformers_module.VideoProcessorMixin = _video_processor_base()
    processing_utils._LazyAutoProcessorMapping._MAPPING_NAMES["video_processor"] = (
        __name__,
        VideolessVideoProcessor.__name__,
    )


def video_processor(stands_for: str, **settings: Any) -> Any:
    """The real video processor where torchvision exists, else the stand-in with the same settings."""
    if is_torchvision_available():
        import transformers

        return getattr(transformers, stands_for)(**settings)
    enable_videoless_processors()
    return VideolessVideoProcessor(stands_for=stands_for, **settings)
