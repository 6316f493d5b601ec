"""MICS wire protocol: generated protobuf modules, frame codec, signing, ids. Pure, no I/O."""
