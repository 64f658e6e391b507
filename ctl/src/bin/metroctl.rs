fn main() {
    println!("metroctl: not yet wired");
}
