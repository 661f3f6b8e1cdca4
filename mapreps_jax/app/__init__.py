"""The digits application built on the library: the bundled handwritten digits (:mod:`.datasets`), the digit
classifier and digit-FD (:mod:`.classifier`, :mod:`.perception`), the bundled diffusion prior (:mod:`.pretrained`),
the restoration tasks (:mod:`.digits`, ``mapreps restore``) and the main job (:mod:`.demo`, ``mapreps demo``)."""

from .pretrained import load_default_prior, load_classifier
from .demo import DemoConfig, run_demo

__all__ = ["load_default_prior", "load_classifier", "DemoConfig", "run_demo"]
