//! Placeholder interface, replaced by the real registry.
#![allow(missing_docs, unused_variables)]

/// Registers of the probed thread at the probe point.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Regs {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ip: u64,
}

pub enum Location {
    Symbol(String),
    SymbolOffset(String, u64),
    Address(u64),
}

pub struct Probe;
pub struct ProbeHandle;
#[derive(Debug)]
pub struct ProbeError;

impl Probe {
    pub fn at(loc: Location) -> Probe {
        todo!()
    }
    pub fn on_hit(self, f: impl Fn(&mut Regs) + Send + Sync + 'static) -> Probe {
        todo!()
    }
    pub fn register(self) -> Result<ProbeHandle, ProbeError> {
        todo!()
    }
}

impl ProbeHandle {
    pub fn unregister(self) -> Result<(), ProbeError> {
        todo!()
    }
    pub fn hits(&self) -> u64 {
        todo!()
    }
}
