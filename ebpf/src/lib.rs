//! Present only so that cargo sees a library target; the kernel programs live in `main.rs`.
#![no_std]
