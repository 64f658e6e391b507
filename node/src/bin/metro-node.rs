fn main() {
    println!("metro-node: not yet wired");
}
