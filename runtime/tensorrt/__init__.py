"""The TensorRT backend: engines built by `gemma3-build` from a tensorrt-target export, run with cuda-python.

    engines.py  engines.json read and checked (TensorRT version, GPU, precision), the decoder's binding plan
    cuda.py     device / pinned buffers, copies on a stream, CUDA graphs (cuda-python's runtime API)
    decoder.py  TensorRTDecoder: OrtDecoder's interface (new_cache, step, prefill, chunks) over the engine
    vision.py   TensorRTVision: OrtVision's interface over the vision engine

`gemma3.runtime.api.load` picks this backend for tensorrt-target folders that hold engines. Importing this
package needs neither tensorrt nor cuda-python (they are imported when a decoder is created), and nothing here
imports torch or triton.
"""
