//! The device lifecycle every device implements, PCI and legacy alike (bhyve's `pe_pause`,
//! `pe_resume`, `pe_snapshot`; propolis's `Lifecycle`): start, pause, resume, reset, and
//! save/restore of a versioned state.
//!
//! The rules:
//! - `pause` stops the device producing work: no more interrupts, no more guest-memory
//!   accesses, no more requests taken off its queues; requests already in flight are completed
//!   into the guest's rings before it returns, so a saved state has nothing half done.
//! - `save` and `restore` are valid only while paused (a device answers
//!   [`StateError::NotPaused`] otherwise). A saved state is self-describing: the device kind
//!   and a version number go with the data, and a device refuses a state of another kind or a
//!   version it does not read, with a message that says which.
//! - `restore` is made into a freshly created device of the same configuration; the device
//!   stays paused until `resume`. Saving it again gives the same state (the round trip each
//!   device's unit tests check).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// One device's saved state: what it is, the version of its state layout, and the data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    /// The device kind (its emulation name, e.g. `virtio-blk`, `uart`).
    pub kind: String,
    /// The version of the device's state layout; bumped whenever its fields change.
    pub version: u32,
    pub data: serde_json::Value,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StateError {
    #[error("{0}: state can be saved or restored only while the device is paused")]
    NotPaused(String),
    #[error("state of a {found} device given to a {want} device")]
    WrongKind { want: String, found: String },
    #[error("{kind}: state version {found} is not one this rhyve reads (it reads version {want})")]
    Version { kind: String, want: u32, found: u32 },
    #[error("{kind}: malformed state: {why}")]
    Malformed { kind: String, why: String },
}

impl DeviceState {
    /// Packs a device's state structure.
    pub fn new<T: Serialize>(kind: &str, version: u32, state: &T) -> Result<Self, StateError> {
        let data = serde_json::to_value(state).map_err(|e| StateError::Malformed {
            kind: kind.into(),
            why: e.to_string(),
        })?;
        Ok(DeviceState {
            kind: kind.into(),
            version,
            data,
        })
    }

    /// Unpacks a state saved by a device of `kind` at `version`, refusing any other.
    pub fn parse<T: DeserializeOwned>(&self, kind: &str, version: u32) -> Result<T, StateError> {
        if self.kind != kind {
            return Err(StateError::WrongKind {
                want: kind.into(),
                found: self.kind.clone(),
            });
        }
        if self.version != version {
            return Err(StateError::Version {
                kind: kind.into(),
                want: version,
                found: self.version,
            });
        }
        T::deserialize(&self.data).map_err(|e| StateError::Malformed {
            kind: kind.into(),
            why: e.to_string(),
        })
    }

    /// Checks that a restored field has the value the device was configured with (a state
    /// saved with another configuration is refused rather than half applied).
    pub fn expect_same<T: PartialEq + std::fmt::Debug>(
        kind: &str,
        what: &str,
        saved: T,
        configured: T,
    ) -> Result<(), StateError> {
        if saved == configured {
            Ok(())
        } else {
            Err(StateError::Malformed {
                kind: kind.into(),
                why: format!("saved with {what} {saved:?}, configured with {configured:?}"),
            })
        }
    }
}

/// What every device does over the VM's life. Defaults are for a device with no thread of its
/// own and no state beyond its registers; such a device still implements `save`/`restore`.
pub trait Lifecycle: Send {
    /// The VM starts running (after creation or after a restore has been resumed).
    fn start(&mut self) {}
    /// Stop producing work; complete what is in flight (see the module rules).
    fn pause(&mut self) {}
    /// Carry on after `pause` (or after `restore`).
    fn resume(&mut self) {}
    /// The machine resets: back to the power-on state.
    fn reset(&mut self) {}
    /// The device's state; only while paused.
    fn save(&mut self) -> Result<DeviceState, StateError>;
    /// Takes a state `save` produced; only while paused (a restored device stays paused).
    fn restore(&mut self, state: &DeviceState) -> Result<(), StateError>;
}

/// A paused flag with the check `save` and `restore` make: the small piece of state every
/// device keeps for the lifecycle rules.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Paused(bool);

impl Paused {
    pub fn set(&mut self, paused: bool) {
        self.0 = paused;
    }
    pub fn get(&self) -> bool {
        self.0
    }
    /// Ok while paused; `NotPaused` naming `kind` otherwise.
    pub fn check(&self, kind: &str) -> Result<(), StateError> {
        if self.0 {
            Ok(())
        } else {
            Err(StateError::NotPaused(kind.into()))
        }
    }
}

/// Saves `dev`, restores the state into `fresh`, saves `fresh` again and returns both states
/// (for the round-trip unit tests: the two must be equal). Both devices are paused first.
pub fn round_trip(
    dev: &mut dyn Lifecycle,
    fresh: &mut dyn Lifecycle,
) -> Result<(DeviceState, DeviceState), StateError> {
    dev.pause();
    let saved = dev.save()?;
    // Through the bytes a snapshot would hold, not just the in-memory value.
    let bytes = serde_json::to_vec(&saved).map_err(|e| StateError::Malformed {
        kind: saved.kind.clone(),
        why: e.to_string(),
    })?;
    let read: DeviceState = serde_json::from_slice(&bytes).map_err(|e| StateError::Malformed {
        kind: saved.kind.clone(),
        why: e.to_string(),
    })?;
    fresh.pause();
    fresh.restore(&read)?;
    let again = fresh.save()?;
    Ok((saved, again))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Counter {
        n: u32,
        paused: Paused,
    }

    #[derive(Serialize, Deserialize)]
    struct CounterState {
        n: u32,
    }

    impl Lifecycle for Counter {
        fn pause(&mut self) {
            self.paused.set(true);
        }
        fn resume(&mut self) {
            self.paused.set(false);
        }
        fn save(&mut self) -> Result<DeviceState, StateError> {
            self.paused.check("counter")?;
            DeviceState::new("counter", 1, &CounterState { n: self.n })
        }
        fn restore(&mut self, s: &DeviceState) -> Result<(), StateError> {
            self.paused.check("counter")?;
            self.n = s.parse::<CounterState>("counter", 1)?.n;
            Ok(())
        }
    }

    #[test]
    fn states_round_trip_and_wrong_ones_are_refused() {
        let mut a = Counter {
            n: 7,
            ..Default::default()
        };
        assert_eq!(a.save(), Err(StateError::NotPaused("counter".into())));
        let mut b = Counter::default();
        let (s1, s2) = round_trip(&mut a, &mut b).unwrap();
        assert_eq!(s1, s2);
        assert_eq!(b.n, 7);
        let mut newer = s1.clone();
        newer.version = 2;
        let e = b.restore(&newer).unwrap_err();
        assert!(e.to_string().contains("version 2"), "{e}");
        let mut other = s1.clone();
        other.kind = "uart".into();
        assert!(matches!(
            b.restore(&other),
            Err(StateError::WrongKind { .. })
        ));
        let mut bad = s1;
        bad.data = serde_json::json!({"m": 1});
        assert!(matches!(b.restore(&bad), Err(StateError::Malformed { .. })));
    }
}
