// swift-tools-version:6.1
// libFuzzer targets, outside the main package: they link libFuzzer's own `main`, which an ordinary
// build of the main package must not. Build and run them with ../netns-scripts/fuzz.sh.
import Foundation
import PackageDescription

// A path dependency is identified by its directory's name, which is whatever the clone is called.
let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()

let package = Package(
    name: "NBSFuzz",
    dependencies: [
        .package(path: root.path),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
    ],
    targets: [
        .executableTarget(
            name: "nbs-fuzz",
            dependencies: [
                .product(name: "NBSProtocol", package: root.lastPathComponent),
                .product(name: "NBSNetlink", package: root.lastPathComponent),
                .product(name: "NIOCore", package: "swift-nio"),
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)
