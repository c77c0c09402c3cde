import Testing
@testable import NBSNetlink

@Suite struct InterfaceTableTests {
    private func table(links: [NetworkInterface] = [Sample.link(2, "eth0")]) -> InterfaceTable {
        var table = InterfaceTable()
        _ = table.apply(links.map(NetlinkMessage.newLink))
        return table
    }

    @Test func newUpLinkIsReportedOnce() {
        var table = InterfaceTable()
        #expect(table.apply(.newLink(Sample.link(2, "eth0"))).map(\.brief) == ["interfaceUp eth0"])
        #expect(table.apply(.newLink(Sample.link(2, "eth0"))).isEmpty)
        #expect(table.apply(.newLink(Sample.link(3, "eth1", up: false))).isEmpty, "a link that appears down changes nothing usable")
        #expect(table.interfaces.map(\.name) == ["eth0", "eth1"])
    }

    @Test func addingAUsableAddressIsReportedOnceWithTheLinkName() {
        var table = table()
        let events = table.apply(.newAddress(Sample.v4("192.0.2.1")))
        #expect(events.count == 1)
        guard case .addressAdded(let address) = events.first else { return }
        #expect(address.interfaceName == "eth0")
        #expect(table.apply(.newAddress(Sample.v4("192.0.2.1"))).isEmpty, "a refresh (e.g. new lifetimes) is not news")
        #expect(table.usableAddresses.map(\.address) == ["192.0.2.1"])
    }

    @Test func removalIsReportedOnlyForWhatWasUsable() {
        var table = table()
        _ = table.apply(.newAddress(Sample.v4("192.0.2.1")))
        _ = table.apply(.newAddress(Sample.v6("fe80::1", scope: 253)))
        #expect(table.apply(.delAddress(Sample.v4("192.0.2.1"))).map(\.brief) == ["addressRemoved 192.0.2.1"])
        #expect(table.apply(.delAddress(Sample.v4("192.0.2.1"))).isEmpty, "already gone")
        #expect(table.apply(.delAddress(Sample.v6("fe80::1", scope: 253))).isEmpty, "never usable")
        #expect(table.addresses.isEmpty)
    }

    @Test func tentativeAddressBecomesUsableWhenDADCompletes() {
        var table = table()
        #expect(table.apply(.newAddress(Sample.v6("2001:db8::1", flags: Sample.tentative))).isEmpty)
        #expect(table.addresses.count == 1 && table.usableAddresses.isEmpty)
        let events = table.apply(.newAddress(Sample.v6("2001:db8::1", flags: 0)))
        #expect(events.map(\.brief) == ["addressAdded 2001:db8::1"])
        if case .addressAdded(let address) = events.first {
            #expect(!address.isTentative && address.isUsableForSubflows)
        }
    }

    @Test func optimisticAddressIsUsableWhileTentative() {
        var table = table()
        let events = table.apply(.newAddress(Sample.v6("2001:db8::5", flags: Sample.tentative | Sample.optimistic)))
        #expect(events.map(\.brief) == ["addressAdded 2001:db8::5"])
    }

    @Test func dadFailureWithdrawsAnAddress() {
        var table = table()
        _ = table.apply(.newAddress(Sample.v6("2001:db8::1", flags: Sample.tentative)))
        #expect(table.apply(.newAddress(Sample.v6("2001:db8::1", flags: Sample.tentative | Sample.dadFailed))).isEmpty)
        _ = table.apply(.newAddress(Sample.v6("2001:db8::2")))
        #expect(table.apply(.newAddress(Sample.v6("2001:db8::2", flags: Sample.dadFailed))).map(\.brief)
            == ["addressRemoved 2001:db8::2"])
    }

    @Test func deprecatedAddressStaysUsable() {
        var table = table()
        _ = table.apply(.newAddress(Sample.v6("2001:db8::3")))
        #expect(table.apply(.newAddress(Sample.v6("2001:db8::3", flags: Sample.deprecated))).isEmpty)
        #expect(table.usableAddresses.first?.isDeprecated == true)
    }

    @Test func loopbackAndLinkLocalAddressesAreKeptButNotReported() {
        var table = table(links: [NetworkInterface(index: 1, name: "lo", isUp: true, isLoopback: true), Sample.link(2, "eth0")])
        #expect(table.apply(.newAddress(Sample.v4("127.0.0.1", prefix: 8, on: 1, scope: 254))).isEmpty)
        #expect(table.apply(.newAddress(Sample.v6("::1", prefix: 128, on: 1, scope: 254))).isEmpty)
        #expect(table.apply(.newAddress(Sample.v6("fe80::1", scope: 253))).isEmpty)
        #expect(table.apply(.newAddress(Sample.v4("169.254.1.1", prefix: 16))).isEmpty)
        #expect(table.addresses.count == 4)
        #expect(table.usableAddresses.isEmpty)
    }

    @Test func linkDownWithdrawsItsAddressesAndUpRestoresThem() {
        var table = table(links: [Sample.link(2, "eth0"), Sample.link(3, "eth1")])
        _ = table.apply(.newAddress(Sample.v4("192.0.2.1")))
        _ = table.apply(.newAddress(Sample.v6("2001:db8::1")))
        _ = table.apply(.newAddress(Sample.v4("198.51.100.1", on: 3)))
        #expect(table.apply(.newLink(Sample.link(2, "eth0", up: false))).map(\.brief)
            == ["interfaceDown eth0", "addressRemoved 192.0.2.1", "addressRemoved 2001:db8::1"])
        #expect(table.usableAddresses.map(\.address) == ["198.51.100.1"])
        #expect(table.addresses.count == 3, "the kernel keeps IPv4 addresses on a down link")
        #expect(table.apply(.newAddress(Sample.v4("192.0.2.9"))).isEmpty, "added while down: not usable yet")
        #expect(table.apply(.newLink(Sample.link(2, "eth0"))).map(\.brief)
            == ["interfaceUp eth0", "addressAdded 192.0.2.1", "addressAdded 192.0.2.9", "addressAdded 2001:db8::1"])
    }

    @Test func carrierLossCountsAsDown() {
        var table = table()
        _ = table.apply(.newAddress(Sample.v4("192.0.2.1")))
        // IFF_UP but not IFF_RUNNING, operstate LOWERLAYERDOWN: what the parser makes of a veth
        // whose peer went down.
        let noCarrier = NetworkInterface(index: 2, name: "eth0", isUp: false, isLoopback: false, flags: 0x1003, operState: 3)
        #expect(table.apply(.newLink(noCarrier)).map(\.brief) == ["interfaceDown eth0", "addressRemoved 192.0.2.1"])
    }

    @Test func linkRemovalRemovesItsAddresses() {
        var table = table(links: [Sample.link(2, "eth0"), Sample.link(3, "eth1")])
        _ = table.apply(.newAddress(Sample.v4("192.0.2.1")))
        _ = table.apply(.newAddress(Sample.v6("fe80::1", scope: 253)))
        _ = table.apply(.newAddress(Sample.v4("198.51.100.1", on: 3)))
        #expect(table.apply(.delLink(Sample.link(2, "eth0", up: false))).map(\.brief)
            == ["interfaceRemoved eth0", "addressRemoved 192.0.2.1"])
        #expect(table.interfaces.map(\.name) == ["eth1"])
        #expect(table.addresses.map(\.address) == ["198.51.100.1"])
        #expect(table.apply(.delLink(Sample.link(2, "eth0"))).isEmpty, "already gone")
    }

    @Test func interfaceRemovedCarriesTheLastKnownState() {
        var table = table()
        let events = table.apply(.delLink(NetworkInterface(index: 2, name: "", isUp: false)))
        #expect(events == [.interfaceRemoved(Sample.link(2, "eth0"))])
    }

    @Test func renameKeepsAddressesQuietly() {
        var table = table()
        _ = table.apply(.newAddress(Sample.v4("192.0.2.1")))
        #expect(table.apply(.newLink(Sample.link(2, "wan0"))).isEmpty)
        #expect(table.addresses.map(\.interfaceName) == ["wan0"])
    }

    @Test func sameAddressWithTwoPrefixesIsTwoAddresses() {
        var table = table()
        _ = table.apply(.newAddress(Sample.v4("192.0.2.1", prefix: 24)))
        _ = table.apply(.newAddress(Sample.v4("192.0.2.1", prefix: 25)))
        #expect(table.apply(.delAddress(Sample.v4("192.0.2.1", prefix: 24))).count == 1)
        #expect(table.usableAddresses.map(\.prefixLength) == [25])
    }

    @Test func addressesOfUnknownLinksAreUsable() {
        var table = InterfaceTable()
        #expect(table.apply(.newAddress(Sample.v4("192.0.2.1", on: 9))).map(\.brief) == ["addressAdded 192.0.2.1"])
        #expect(table.apply(.newLink(Sample.link(9, "late0", up: false))).map(\.brief) == ["addressRemoved 192.0.2.1"])
    }

    @Test func controlAndUnknownMessagesChangeNothing() {
        var table = table()
        let before = table
        for message: NetlinkMessage in [.done, .ack, .error(errno: 16), .other(type: 24),
                                        .malformed(type: 20, .missingAddress(messageType: 20))] {
            #expect(table.apply(message).isEmpty)
        }
        #expect(table == before)
    }

    @Test func resyncRemovesWhatTheDumpNoLongerMentions() {
        var table = table(links: [Sample.link(2, "eth0"), Sample.link(3, "eth1")])
        _ = table.apply(.newAddress(Sample.v4("192.0.2.1")))
        _ = table.apply(.newAddress(Sample.v4("192.0.2.2")))
        _ = table.apply(.newAddress(Sample.v4("198.51.100.1", on: 3)))

        table.beginResync()
        var events = table.apply([.newLink(Sample.link(2, "eth0")), .newAddress(Sample.v4("192.0.2.1")),
                                  .newAddress(Sample.v4("203.0.113.5")), .done])
        #expect(events.map(\.brief) == ["addressAdded 203.0.113.5"])
        events = table.finishResync()
        #expect(events.map(\.brief) == ["interfaceRemoved eth1", "addressRemoved 198.51.100.1", "addressRemoved 192.0.2.2"])
        #expect(table.usableAddresses.map(\.address) == ["192.0.2.1", "203.0.113.5"])
        #expect(table.finishResync().isEmpty, "no resync in progress")
    }

    @Test func eventsDuringAResyncCountAsSeen() {
        var table = table()
        table.beginResync()
        _ = table.apply(.newLink(Sample.link(2, "eth0")))
        // The address dump had already passed this address when it was added; the event is the
        // only news of it and must survive the sweep.
        _ = table.apply(.newAddress(Sample.v4("192.0.2.77")))
        #expect(table.finishResync().isEmpty)
        #expect(table.usableAddresses.map(\.address) == ["192.0.2.77"])
    }

    @Test func cancelledResyncRemovesNothing() {
        var table = table()
        _ = table.apply(.newAddress(Sample.v4("192.0.2.1")))
        table.beginResync()
        table.cancelResync()
        #expect(table.finishResync().isEmpty)
        #expect(table.usableAddresses.count == 1)
    }

    @Test func currentStateEventsRebuildTheUsableState() {
        var table = table(links: [Sample.link(2, "eth0"), Sample.link(3, "eth1", up: false)])
        _ = table.apply(.newAddress(Sample.v4("192.0.2.1")))
        _ = table.apply(.newAddress(Sample.v4("198.51.100.1", on: 3)))
        _ = table.apply(.newAddress(Sample.v6("2001:db8::1", flags: Sample.tentative)))
        #expect(table.currentStateEvents.map(\.brief) == ["interfaceUp eth0", "addressAdded 192.0.2.1"])
    }

    /// The whole captured session, fed through one table as the monitor would.
    @Test func capturedSessionProducesPathManagerEvents() throws {
        var table = InterfaceTable()
        var byStep: [String: [String]] = [:]
        for step in Captured.steps {
            let messages = try step.datagrams.flatMap { try parseNetlinkMessages([UInt8](hex: $0)) }
            byStep[step.step] = table.apply(messages).map(\.brief)
        }
        #expect(byStep["link set lo up"] == ["interfaceUp lo"])
        #expect(byStep["link add d0 type veth peer name d0p"] == [])
        #expect(byStep["link set d0p up"] == [], "admin up without carrier is not up")
        #expect(byStep["link set d0 up"] == ["interfaceUp d0", "interfaceUp d0p"])
        #expect(byStep["addr add 192.0.2.1/24 dev d0"] == ["addressAdded 192.0.2.1"])
        #expect(byStep["addr add 2001:db8::1/64 dev d0 nodad"] == ["addressAdded 2001:db8::1"])
        #expect(byStep["add v6 with a flag above 0xff (only in IFA_FLAGS)"] == ["addressAdded 2001:db8:2::1"])
        #expect(byStep["add IPv4 link-local (universe scope)"] == [])
        #expect(byStep["add tentative v6 on v0"] == [])
        #expect(byStep["dad completes"] == ["addressAdded 2001:db8:1::1"])
        #expect(byStep["dump links"] == [] && byStep["dump inet addrs"] == [] && byStep["dump inet6 addrs"] == [],
                "a dump of a known state changes nothing")
        #expect(byStep["addr del 192.0.2.1/24 dev d0"] == ["addressRemoved 192.0.2.1"])
        #expect(byStep["addr add 198.51.100.7/24 dev d0 label d0:alias"] == ["addressAdded 198.51.100.7"])
        #expect(byStep["peer v1 down (v0 loses carrier)"] == ["interfaceDown v1", "interfaceDown v0", "addressRemoved 2001:db8:1::1"])
        #expect(byStep["enslave d0p to bridge (AF_BRIDGE messages)"] == [])
        #expect(byStep["link set d0 down"] == [
            "interfaceDown d0", "addressRemoved 198.51.100.7", "addressRemoved 2001:db8:2::1", "addressRemoved 2001:db8::1",
            "interfaceDown d0p",
        ])
        #expect(byStep["link del d0"] == ["interfaceRemoved d0", "interfaceRemoved d0p"])
        #expect(byStep["link del b0"] == ["interfaceRemoved b0"])
        #expect(table.interfaces.map(\.name) == ["lo"])
        #expect(table.usableAddresses.isEmpty)
        #expect(table.addresses.map(\.address) == ["127.0.0.1", "::1"])
        #expect(table.addresses.allSatisfy { $0.interfaceName == "lo" })
    }
}
