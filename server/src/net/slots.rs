//! Connection slots of one listener: a global limit, and a lower one per
//! address so that no single address can take every slot.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The address a limit counts a peer under. IPv4 addresses count alone; an IPv6
/// peer counts with its whole /64, which one host (or one home network) usually
/// holds and can pick addresses from at will. IPv4-mapped IPv6 counts as IPv4.
pub fn address_group(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut segments = v6.segments();
                segments[4..].fill(0);
                IpAddr::V6(segments.into())
            }
        },
    }
}

/// Why a connection was not given a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Every slot of the listener is taken.
    Full,
    /// The peer's address holds its share of slots already.
    AddressFull,
}

impl Refusal {
    /// The `reason` label of the refusal metric.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Full => "limit",
            Self::AddressFull => "address_limit",
        }
    }
}

/// Hands out connection slots. Cheap to clone, `Send`.
#[derive(Clone, Debug)]
pub struct ConnectionSlots {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    max_total: usize,
    max_per_address: usize,
    taken: Mutex<Taken>,
}

#[derive(Debug, Default)]
struct Taken {
    total: usize,
    per_address: HashMap<IpAddr, usize>,
}

impl ConnectionSlots {
    pub fn new(max_total: usize, max_per_address: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                max_total,
                max_per_address: max_per_address.min(max_total),
                taken: Mutex::new(Taken::default()),
            }),
        }
    }

    /// A slot for a connection from `peer`, held until the [`Slot`] drops.
    pub fn try_take(&self, peer: IpAddr) -> Result<Slot, Refusal> {
        let group = address_group(peer);
        let mut taken = self.taken();
        if taken.total >= self.inner.max_total {
            return Err(Refusal::Full);
        }
        let of_address = taken.per_address.entry(group).or_insert(0);
        if *of_address >= self.inner.max_per_address {
            return Err(Refusal::AddressFull);
        }
        *of_address += 1;
        taken.total += 1;
        Ok(Slot {
            slots: self.clone(),
            group,
        })
    }

    /// Slots taken now.
    pub fn taken_now(&self) -> usize {
        self.taken().total
    }

    fn release(&self, group: IpAddr) {
        let mut taken = self.taken();
        taken.total -= 1;
        if let Some(count) = taken.per_address.get_mut(&group) {
            *count -= 1;
            if *count == 0 {
                taken.per_address.remove(&group);
            }
        }
    }

    fn taken(&self) -> std::sync::MutexGuard<'_, Taken> {
        // Counts stay consistent: every update happens in one short critical section.
        self.inner.taken.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One connection's slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    slots: ConnectionSlots,
    group: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.release(self.group);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn one_address_cannot_take_every_slot() {
        let slots = ConnectionSlots::new(4, 2);
        let a1 = slots.try_take(ip("10.0.0.1")).unwrap();
        let _a2 = slots.try_take(ip("10.0.0.1")).unwrap();
        assert_eq!(
            slots.try_take(ip("10.0.0.1")).unwrap_err(),
            Refusal::AddressFull
        );
        let _b1 = slots.try_take(ip("10.0.0.2")).unwrap();
        let _b2 = slots.try_take(ip("10.0.0.2")).unwrap();
        assert_eq!(slots.try_take(ip("10.0.0.3")).unwrap_err(), Refusal::Full);
        drop(a1);
        assert_eq!(slots.taken_now(), 3);
        slots
            .try_take(ip("10.0.0.3"))
            .expect("a freed slot is free again");
    }

    #[test]
    fn ipv6_peers_count_per_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(
            address_group(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")),
            ip("2001:db8:1:2::")
        );
        assert_eq!(address_group(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
        let slots = ConnectionSlots::new(10, 1);
        let _first = slots.try_take(ip("2001:db8::1")).unwrap();
        assert_eq!(
            slots.try_take(ip("2001:db8::2")).unwrap_err(),
            Refusal::AddressFull
        );
        slots
            .try_take(ip("2001:db8:0:1::1"))
            .expect("another /64 is another address");
    }
}
