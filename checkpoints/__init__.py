"""Files: hashes and atomic writes, Keras weights files, converted folders against their manifests, the
local store, and the Hugging Face Hub. Stands on `zoo.core` only."""
