// `sqlx::migrate!` embeds the migration files at compile time, but cargo only rebuilds a crate
// when its own sources change: without this, a new migration would silently not ship.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
