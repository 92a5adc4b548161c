//! The AFL++ driver: `orbit-fuzz-afl TARGET`, one of `splitter`, `header`, `normalize`,
//! `cursor`, `decompress`, `multipart`. Built by `cargo afl build --features afl -p orbit-fuzz` (see
//! docs/security.md); a plain `cargo build` leaves it out.

use std::sync::Mutex;

use orbit_fuzz::multipart::Gateway;
use orbit_fuzz::PURE_TARGETS;

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    if name == "multipart" {
        // Made on the first input, after AFL's fork server has forked: SQLite's threads and
        // the runtime must belong to the process that fuzzes. Taken back at the end, so that
        // its temporary directory is removed (statics are never dropped).
        static GATEWAY: Mutex<Option<Gateway>> = Mutex::new(None);
        afl::fuzz!(|data: &[u8]| {
            let mut gateway = GATEWAY.lock().unwrap_or_else(|e| e.into_inner());
            gateway.get_or_insert_with(Gateway::new).check(data);
        });
        drop(GATEWAY.lock().unwrap_or_else(|e| e.into_inner()).take());
        return;
    }
    let Some((_, target)) = PURE_TARGETS.iter().find(|(n, _)| *n == name) else {
        let names: Vec<&str> = PURE_TARGETS.iter().map(|(n, _)| *n).collect();
        eprintln!("usage: orbit-fuzz-afl {{{}|multipart}}", names.join("|"));
        std::process::exit(2);
    };
    afl::fuzz!(|data: &[u8]| target(data));
}
