//! Device emulations. `legacy` holds the LPC-side platform devices (bhyve's `-l` world); PCI
//! devices live in `pci` and `virtio`. Devices sit below the VMM: a device that stops the VM
//! (a reset port, the power-off register) does so through [`VmStop`], which the VMM provides.

pub mod legacy;

/// Why the VM stopped, and so the process exit status (bhyve(8) EXIT STATUS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuspendReason {
    /// Guest reset (0xCF9, 0x64, ACPI reset): status 0.
    Reset,
    /// Guest powered off: status 1.
    PowerOff,
    /// Every vCPU halted with interrupts disabled: status 2.
    Halt,
    /// Triple fault: status 3.
    TripleFault,
    /// rhyve stopped the VM because of an error: status 4.
    Error,
}

impl SuspendReason {
    pub fn exit_status(self) -> i32 {
        match self {
            SuspendReason::Reset => 0,
            SuspendReason::PowerOff => 1,
            SuspendReason::Halt => 2,
            SuspendReason::TripleFault => 3,
            SuspendReason::Error => 4,
        }
    }
}

/// How a device asks the VM to stop (bhyve `vm_suspend`); the VMM's run control implements it.
pub trait VmStop: Send + Sync {
    /// Requests that the VM stop; the first reason wins.
    fn stop(&self, reason: SuspendReason);
}

/// A `VmStop` that records the first reason it is given: for device unit tests.
#[cfg(test)]
#[derive(Default)]
pub struct StopRecorder(std::sync::Mutex<Option<SuspendReason>>);

#[cfg(test)]
impl StopRecorder {
    pub fn suspend_reason(&self) -> Option<SuspendReason> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
    pub fn is_suspended(&self) -> bool {
        self.suspend_reason().is_some()
    }
}

#[cfg(test)]
impl VmStop for StopRecorder {
    fn stop(&self, reason: SuspendReason) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(reason);
    }
}

/// Counts the pulses of an interrupt line: the irqfd's stand-in in device unit tests.
#[cfg(test)]
#[derive(Clone, Default)]
pub struct PulseCount(std::sync::Arc<std::sync::atomic::AtomicUsize>);

#[cfg(test)]
impl PulseCount {
    /// The pulses since the last call.
    pub fn take(&self) -> usize {
        self.0.swap(0, std::sync::atomic::Ordering::SeqCst)
    }
}

#[cfg(test)]
impl vm_superio::Trigger for PulseCount {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}
