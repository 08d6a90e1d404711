"""llama.cpp, the kind `llama_cpp`, in three modes that `options.mode` picks (backends/registry.py):

- in_process.py: `llama_cpp.Llama` in the worker (mode in_process, the default);
- server.py: llama-cpp-python's `python -m llama_cpp.server` (mode server) and llama.cpp's own C++ `llama-server`
  (mode llama_server), launched by the shared launcher or attached with `url:`, spoken to through the OpenAI client;
- base.py: what the three share (the GGUF file, its layout, the layers' placement, the context check); options.py
  their options; offload.py the placement under a VRAM budget; gguf.py the HF folder → GGUF converter.
"""
