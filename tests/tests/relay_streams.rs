//! Stream provisioning: incompatible streams refused at start, and streams
//! created with their settings on a 3-node cluster of private servers.

use std::time::Duration;

use outbox_nats::{ProvisionError, provision};
use outbox_tests::nats::{PrivateCluster, TestNats};

/// The duplicate window the relay asks for.
const WINDOW: Duration = Duration::from_secs(120);

#[tokio::test]
async fn incompatible_streams_are_refused_at_start() {
    let nats = TestNats::shared().await;
    let context = nats.publisher().context().clone();
    let narrow = nats.stream("ORDERS", "orders");
    context
        .create_stream(async_nats::jetstream::stream::Config {
            name: narrow.name.clone(),
            subjects: vec![format!("{}.orders.created", nats.namespace)],
            ..Default::default()
        })
        .await
        .expect("create a narrow stream");
    let short = nats.stream("BILLING", "billing");
    context
        .create_stream(async_nats::jetstream::stream::Config {
            name: short.name.clone(),
            subjects: short.subjects.clone(),
            duplicate_window: Duration::from_secs(1),
            ..Default::default()
        })
        .await
        .expect("create a stream with a short duplicate window");

    let error = provision(&context, &[narrow], WINDOW)
        .await
        .expect_err("subjects");
    assert!(
        matches!(error, ProvisionError::SubjectsNotCaptured { .. }),
        "{error}"
    );
    assert!(error.to_string().contains(".orders.>"), "{error}");
    let error = provision(&context, &[short], WINDOW)
        .await
        .expect_err("window");
    assert!(
        matches!(error, ProvisionError::DuplicateWindowTooShort { .. }),
        "{error}"
    );
    nats.finish().await;
}

/// On a 3-node cluster of private servers, `provision` creates a stream with
/// the replicas, storage and limits asked for, and refuses, naming the
/// setting, an existing stream with other replicas or too short a duplicate
/// window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_created_with_their_settings_and_a_replica_mismatch_is_refused() {
    use async_nats::jetstream::stream::StorageType;
    use outbox_nats::{NatsConfig, StreamSettings};
    let cluster = PrivateCluster::start(3).await;
    let client = NatsConfig::new(&cluster.url)
        .expect("server list")
        .connect()
        .await
        .expect("connect to the cluster");
    let nats = TestNats {
        client,
        namespace: "cluster".into(),
    };
    let context = nats.publisher().context().clone();
    let settings = StreamSettings::default()
        .replicas(3)
        .storage(StorageType::Memory)
        .max_age(Duration::from_secs(86_400))
        .max_bytes(64 << 20);
    let spec = nats.stream("ORDERS", "orders").with_settings(settings);
    // The cluster elects its JetStream leader after it starts listening.
    let mut created = provision(&context, std::slice::from_ref(&spec), WINDOW).await;
    for _ in 0..100 {
        if created.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        created = provision(&context, std::slice::from_ref(&spec), WINDOW).await;
    }
    created.expect("provision on the cluster");
    let info = context
        .get_stream(&spec.name)
        .await
        .expect("stream")
        .info()
        .await
        .expect("stream info")
        .clone();
    assert_eq!(info.config.num_replicas, 3);
    assert_eq!(info.config.storage, StorageType::Memory);
    assert_eq!(info.config.max_age, Duration::from_secs(86_400));
    assert_eq!(info.config.max_bytes, 64 << 20);
    assert_eq!(info.config.duplicate_window, WINDOW);
    let cluster_info = info.cluster.expect("cluster info");
    assert_eq!(cluster_info.replicas.len(), 2, "a leader and two followers");

    provision(&context, std::slice::from_ref(&spec), WINDOW)
        .await
        .expect("the same settings again are accepted");
    let one = spec
        .clone()
        .with_settings(StreamSettings::default().replicas(1));
    let error = provision(&context, &[one], WINDOW)
        .await
        .expect_err("replicas differ");
    assert!(
        matches!(
            error,
            ProvisionError::Replicas {
                actual: 3,
                required: 1,
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("3 replica(s)"), "{error}");
    let error = provision(&context, std::slice::from_ref(&spec), WINDOW * 2)
        .await
        .expect_err("window");
    assert!(
        matches!(error, ProvisionError::DuplicateWindowTooShort { .. }),
        "{error}"
    );
    // Settings not asked for are not checked.
    provision(&context, &[nats.stream("ORDERS", "orders")], WINDOW)
        .await
        .expect("no settings asked for");
}

/// A namespace said once: its streams, its publisher and its consumer meet
/// under its prefix, and nothing is created outside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_namespace_serves_the_streams_the_publisher_and_the_consumer() {
    use outbox_core::inbox::Metadata;
    use outbox_core::relay::Relay;
    use outbox_tests::fixtures::{OrderCreated, order};
    use outbox_tests::{TestDb, emit_one, eventually};
    use sea_orm::{ActiveModelTrait, ActiveValue::Set, DatabaseTransaction, DbErr, EntityTrait};

    async fn insert(
        event: OrderCreated,
        _: Metadata,
        db: &DatabaseTransaction,
    ) -> Result<(), DbErr> {
        let row = order::ActiveModel {
            id: Set(event.order_id),
            total_cents: Set(event.total_cents),
        };
        row.insert(db).await.map(drop)
    }

    let nats = TestNats::shared().await;
    let test = TestDb::postgres().await;
    let namespace = nats.handle();
    assert_eq!(namespace.name(), Some(nats.namespace.as_str()));
    namespace
        .provision_registry(Duration::from_secs(120))
        .await
        .expect("provision the registry's streams");
    let stream = format!("{}_ORDERS", nats.namespace.to_uppercase());
    let context = namespace.context();
    context
        .get_stream(&stream)
        .await
        .expect("the namespaced stream");
    let prefix = format!("{}_", nats.namespace.to_uppercase());
    let streams = namespace.streams_from_registry().expect("streams");
    assert!(
        streams.iter().all(|spec| spec.name.starts_with(&prefix)),
        "every stream under the namespace: {streams:?}"
    );

    emit_one(
        &test.db,
        OrderCreated {
            order_id: 7,
            total_cents: 70,
        },
    )
    .await
    .expect("commit");
    let relay = Relay::builder(test.db.clone(), namespace.publisher()).build();
    let report = relay.process_batch().await.expect("relay");
    assert_eq!(report.published, 1);

    let consumer = (namespace.consumer(test.db.clone(), "ns-billing"))
        .on::<OrderCreated, _>(insert)
        .build()
        .expect("one handler");
    assert_eq!(consumer.stream(), stream);
    let running = consumer.spawn().await.expect("spawn");
    eventually("the namespaced consumer applies the event", async || {
        order::Entity::find_by_id(7)
            .one(&test.db)
            .await
            .expect("read")
            .is_some()
    })
    .await;
    running.shutdown().await.expect("shutdown");
    nats.finish().await;
    test.finish().await;
}
