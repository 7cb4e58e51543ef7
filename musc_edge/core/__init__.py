"""The MuSc algorithm (MUSC_SPEC 2-6): LNAMD, the pair kernel, MSM, RsCIN, the score composition,
the rolling pool's math, map upsampling, metrics, types, errors, parameters.

Imports numpy, ``array_api_compat`` and the standard library, and nothing of ours outside this
package (``tests/unit/test_architecture.py`` checks it with OpenCV, click, watchdog, ONNX
Runtime, torch and open_clip blocked).
"""
