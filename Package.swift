// swift-tools-version:6.1
import PackageDescription

let package = Package(
    name: "NameBasedSockets",
    platforms: [.macOS(.v13)],
    products: [
        .library(name: "NameBasedSockets", targets: ["NameBasedSockets"]),
        .library(name: "NBSProtocol", targets: ["NBSProtocol"]),
        .executable(name: "nbs-mobility", targets: ["nbs-mobility"]),
        .executable(name: "nbs-bench", targets: ["nbs-bench"]),
        .library(name: "NBSNetlink", targets: ["NBSNetlink"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-crypto.git", from: "3.12.3"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-collections.git", from: "1.6.0"),
    ],
    targets: [
        // libmnl's macros (mnl_attr_for_each, NLMSG_*, IFA_RTA...) cannot be imported by Swift, so the
        // shim header turns each into a prefixed `static inline` function.
        .systemLibrary(name: "CMnl", pkgConfig: "libmnl", providers: [.apt(["libmnl-dev"])]),
        // The interface monitor: the only module that imports CMnl.
        // NIOConcurrencyHelpers for its lock: ThreadSanitizer understands pthread mutexes, not the
        // futex behind Synchronization.Mutex on Linux (it reports false races through it).
        .target(name: "NBSNetlink", dependencies: ["CMnl", .product(name: "NIOConcurrencyHelpers", package: "swift-nio")]),
        .executableTarget(name: "nbs-netlink-probe", dependencies: ["NBSNetlink"]),
        .testTarget(name: "NBSNetlinkTests", dependencies: ["NBSNetlink"]),
        // Pure protocol core: frames, codec, buffers, state machines. No I/O.
        .target(
            name: "NBSProtocol",
            dependencies: [
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Crypto", package: "swift-crypto"),
            ]
        ),
        .target(
            name: "NameBasedSockets",
            dependencies: [
                "NBSProtocol",
                "NBSNetlink",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "HeapModule", package: "swift-collections"),
            ]
        ),
        .executableTarget(
            name: "nbs-mobility",
            dependencies: [
                "NameBasedSockets",
                "NBSNetlink",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ]
        ),
        // The CLI's parsing, rendering and reports, and the binary itself on loopback.
        .testTarget(name: "NBSMobilityTests", dependencies: ["nbs-mobility", "NameBasedSockets"]),
        // Benchmarks print figures (BENCHMARKS.md); they are not part of the test suite's verdict.
        .executableTarget(
            name: "nbs-bench",
            dependencies: [
                "NameBasedSockets",
                "NBSProtocol",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ]
        ),
        .testTarget(name: "NBSProtocolTests", dependencies: ["NBSProtocol"]),
        .testTarget(
            name: "NameBasedSocketsTests",
            dependencies: [
                "NameBasedSockets",
                "NBSNetlink",
                "NBSProtocol",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "Crypto", package: "swift-crypto"),
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)
