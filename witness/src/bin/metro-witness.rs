fn main() {
    println!("metro-witness: not yet wired");
}
