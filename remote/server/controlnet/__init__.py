"""ControlNet as the sd-webui-controlnet extension offers it through A1111's API.

- preprocessors.py: the modules ("canny", "invert", ...) with the extension's names and sliders,
  the weightless ones done with OpenCV, and how a detected map is fitted to the image size;
- annotators.py: the modules that need weights (openpose, depth, ...): controlnet_aux over
  files under models/Annotators (the optional `orch[annotators]` extra);
- units.py: a unit of `alwayson_scripts.controlnet.args` read as the extension reads it;
- catalog.py: the ControlNet models under models/ControlNet and how they load (offline);
- apply.py: the units in a diffusers ControlNet pipeline built on the loaded model's components.
"""
