"""Readers the formats share: zip (torch.save), safetensors headers, pickle opcode streams,
HDF5 superblocks. Each proves a file complete from its bytes, never by loading it. (The
range reader they read ahead with is checkpoint/range_reader.py: the in-job writer hashes
through it too, and must not import the format table.)"""
