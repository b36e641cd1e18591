// Bake the libtorch library folder into this package's executables (the
// example binary and the test), so that they start without LD_LIBRARY_PATH.
fn main() {
    avi_build::link_libtorch();
}
