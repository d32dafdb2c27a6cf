//! Links `fedsend-core` into a `#![no_std]` crate that defines its own panic handler, so a
//! build against a core + alloc sysroot fails if `std` reaches the core (see Cargo.toml).
#![no_std]

// `pub use` makes rustc load the crate (an unused dependency is never loaded, so it would
// prove nothing).
pub use fedsend_core;
pub use fedsend_sim;

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
