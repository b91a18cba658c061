use outbox_core::transactional;

#[transactional]
async fn place_order(id: u64) -> Result<u64, outbox_core::Error> {
    Ok(id)
}

fn main() {}
