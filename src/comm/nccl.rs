//! NCCL data plane (raw NCCL through cudarc's sys bindings, loaded dynamically).
