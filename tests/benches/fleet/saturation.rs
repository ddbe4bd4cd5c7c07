//! What ran out first at a step: each resource that can only be used so much (a core
//! per single thread, the machine's cores, the disk), and how close it came.

use crate::busy::States;
use crate::cpu::machine_cores;
use crate::ramp::Step;

/// Past this share of its capacity a resource counts as full.
const FULL: f64 = 0.9;

/// One resource and how much of it was used (1.0: all of it).
struct Load {
    name: &'static str,
    used: f64,
    detail: String,
}

/// Every resource measured at `step`, fullest first.
fn loads(step: &Step) -> Vec<Load> {
    let mut loads = Vec::new();
    if let Some(busy) = step.busy {
        let cpu = |pick: fn(&crate::cpu::Usage) -> std::time::Duration| {
            step.cpu.map(|u| u.cores(pick(&u)))
        };
        loads.push(thread(
            "the ledger writer thread (every commit)",
            busy.writer,
            cpu(|u| u.writer),
        ));
        loads.push(thread(
            "the server's thread (RPC, HTTP, live streams)",
            busy.server,
            cpu(|u| u.server),
        ));
        loads.push(thread(
            "the bench's client thread (every agent and viewer)",
            busy.client,
            cpu(|u| u.client),
        ));
    }
    if let Some((usage, machine)) = step.cpu.and_then(|u| Some((u, u.machine?))) {
        // Stolen time counts as used: the virtual cores had work, the host ran others.
        let steal = usage.steal.map_or(0.0, |s| usage.cores(s));
        let cores = machine_cores() as f64;
        loads.push(Load {
            name: "the machine's cores",
            used: (usage.cores(machine) + steal) / cores,
            detail: format!(
                "{:.2} of {cores} busy, {steal:.2} more stolen by the host; other processes {:.2}",
                usage.cores(machine),
                usage.elsewhere.map_or(0.0, |e| usage.cores(e))
            ),
        });
    }
    if let Some(utilisation) = step.disk.utilisation {
        loads.push(Load {
            name: "the disk",
            used: utilisation,
            detail: format!("I/O in flight {:.0}% of the time", 100.0 * utilisation),
        });
    }
    loads.sort_by(|a, b| b.used.total_cmp(&a.used));
    loads
}

/// A single thread: busy is the share of wall time it was not idle. What is neither
/// on a core nor waiting for the disk is waiting for a core (or stolen by the host).
fn thread(name: &'static str, states: States, cpu: Option<f64>) -> Load {
    let split = cpu.map_or(String::new(), |on_cpu| {
        let waiting = (states.busy() - states.disk() - on_cpu).max(0.0);
        format!(
            "on a core {:.0}%, runnable without one {:.0}%, ",
            100.0 * on_cpu,
            100.0 * waiting
        )
    });
    Load {
        name,
        used: states.busy(),
        detail: format!(
            "busy {:.0}% of the time: {split}waiting for the disk {:.0}%",
            100.0 * states.busy(),
            100.0 * states.disk()
        ),
    }
}

/// In words: what was full, fullest first, or the nearest to full.
pub fn describe(step: &Step) -> String {
    let loads = loads(step);
    let Some(first) = loads.first() else {
        return "? (no CPU or thread figures on this system)".to_owned();
    };
    let full: Vec<&Load> = loads.iter().filter(|l| l.used >= FULL).collect();
    let rest = loads
        .iter()
        .skip(full.len().max(1))
        .map(|l| format!("{} {:.0}%", l.name, 100.0 * l.used))
        .collect::<Vec<_>>()
        .join(", ");
    if full.is_empty() {
        format!(
            "nothing was full; nearest: {} ({}); then {rest}",
            first.name, first.detail
        )
    } else {
        let listed = full
            .iter()
            .map(|l| format!("{} ({})", l.name, l.detail))
            .collect::<Vec<_>>()
            .join("; ");
        format!("{listed}. Not full: {rest}")
    }
}
