import Testing
@testable import NBSNetlink

/// The parser against messages captured from a real kernel (netns-scripts/tools/capture-fixtures.py).
@Suite struct CapturedMessageParserTests {
    private func addresses(_ step: String) throws -> [InterfaceAddress] {
        try Fixtures.messages(step).compactMap {
            if case .newAddress(let a) = $0 { return a }
            return nil
        }
    }

    private func links(_ step: String) throws -> [NetworkInterface] {
        try Fixtures.messages(step).compactMap {
            if case .newLink(let l) = $0 { return l }
            return nil
        }
    }

    @Test func everyCapturedDatagramParsesCleanly() throws {
        var count = 0
        for (step, bytes) in Fixtures.allDatagrams {
            let messages = try parseNetlinkMessages(bytes)
            #expect(!messages.isEmpty, "\(step)")
            for message in messages {
                if case .malformed = message { Issue.record("malformed message in \(step): \(message)") }
                count += 1
            }
        }
        #expect(count > 70)
    }

    @Test func loopbackComesUpWithHostScopeAddresses() throws {
        let messages = try Fixtures.messages("link set lo up")
        guard case .newLink(let lo) = messages.first else {
            Issue.record("expected a link first, got \(messages)")
            return
        }
        #expect(lo.index == 1 && lo.name == "lo" && lo.isLoopback && lo.isUp)
        #expect(lo.operState == 0, "lo stays IF_OPER_UNKNOWN, and still counts as up")
        let addrs = try addresses("link set lo up")
        #expect(addrs.map(\.address) == ["127.0.0.1", "::1"])
        #expect(addrs.allSatisfy { $0.isLoopback && !$0.isUsableForSubflows && $0.scope == 254 })
        #expect(addrs[0].interfaceName == "lo", "IPv4 carries IFA_LABEL")
        #expect(addrs[1].interfaceName == "", "IPv6 has no label; the table fills the name in")
    }

    @Test func linkOperationalStates() throws {
        let created = try links("link add d0 type veth peer name d0p")
        #expect(created.map(\.name) == ["d0p", "d0"])
        #expect(created.allSatisfy { !$0.isUp && $0.operState == 2 })  // IF_OPER_DOWN
        // Admin up, but the peer is down: IFF_UP without IFF_RUNNING, LOWERLAYERDOWN.
        let halfUp = try links("link set d0p up")
        #expect(halfUp.count == 1 && halfUp[0].flags & 0x1 != 0 && halfUp[0].operState == 3 && !halfUp[0].isUp)
        let bothUp = try links("link set d0 up")
        #expect(bothUp.last?.name == "d0p" && bothUp.last?.isUp == true && bothUp.last?.operState == 6)
        let carrierLost = try links("peer v1 down (v0 loses carrier)")
        #expect(carrierLost.map(\.name) == ["v1", "v0"])
        #expect(carrierLost.allSatisfy { !$0.isUp })
    }

    @Test func ipv4AddressWithLabel() throws {
        let addrs = try addresses("addr add 192.0.2.1/24 dev d0")
        #expect(addrs == [InterfaceAddress(interfaceIndex: 3, interfaceName: "d0", family: .inet, address: "192.0.2.1",
                                           prefixLength: 24, scope: 0, flags: 0x80)])
        #expect(addrs[0].isUsableForSubflows)
        let alias = try addresses("addr add 198.51.100.7/24 dev d0 label d0:alias")
        #expect(alias.map(\.interfaceName) == ["d0:alias"])
    }

    @Test func ipv6AddressWithoutDAD() throws {
        let addrs = try addresses("addr add 2001:db8::1/64 dev d0 nodad")
        #expect(addrs.count == 1)
        #expect(addrs[0].family == .inet6 && addrs[0].address == "2001:db8::1" && addrs[0].prefixLength == 64)
        #expect(addrs[0].flags == 0x82, "IFA_F_PERMANENT | IFA_F_NODAD")
        #expect(addrs[0].isUsableForSubflows)
    }

    @Test func flagsAbove0xFFComeFromIFAFlags() throws {
        let addrs = try addresses("add v6 with a flag above 0xff (only in IFA_FLAGS)")
        let global = try #require(addrs.first { $0.address == "2001:db8:2::1" })
        #expect(global.flags & 0x200 != 0, "IFA_F_NOPREFIXROUTE does not fit the 8-bit ifa_flags")
        let linkLocal = addrs.filter { $0.address.hasPrefix("fe80:") }
        #expect(linkLocal.count == 2)
        #expect(linkLocal.allSatisfy { $0.isLinkLocal && $0.scope == 253 && !$0.isUsableForSubflows })
    }

    @Test func ipv4LinkLocalIsRecognisedByRange() throws {
        let addrs = try addresses("add IPv4 link-local (universe scope)")
        #expect(addrs.count == 1)
        #expect(addrs[0].address == "169.254.7.7" && addrs[0].scope == 0)
        #expect(addrs[0].isLinkLocal && !addrs[0].isUsableForSubflows)
    }

    @Test func tentativeAddressThenDADCompletes() throws {
        let tentative = try addresses("add tentative v6 on v0")
        #expect(tentative.count == 1 && tentative[0].address == "2001:db8:1::1")
        #expect(tentative[0].isTentative && !tentative[0].isUsableForSubflows)
        let done = try addresses("dad completes").filter { $0.address == "2001:db8:1::1" }
        #expect(done.count == 1 && !done[0].isTentative && done[0].isUsableForSubflows)
    }

    @Test func dumpRepliesCarryTheRequestSequenceAndEndWithDone() throws {
        let datagrams = Fixtures.datagrams("dump links")
        let parsed = try datagrams.flatMap { try parseNetlinkMessagesWithHeaders($0) }
        #expect(parsed.allSatisfy { $0.header.sequence == 1001 })
        #expect(parsed.allSatisfy { $0.header.flags & 0x2 != 0 }, "NLM_F_MULTI")
        #expect(parsed.last?.message == .done)
        #expect(parsed.compactMap { if case .newLink(let l) = $0.message { l.name } else { nil } }
            == ["lo", "d0p", "d0", "v1", "v0"])
        #expect(try parseNetlinkMessages(datagrams[0]).count == 5, "one datagram holds several messages")

        let v6 = try Fixtures.messages("dump inet6 addrs")
        #expect(v6.last == .done)
        #expect(v6.filter { if case .newAddress = $0 { true } else { false } }.count == 8)
    }

    @Test func errorReplyCarriesErrno() throws {
        #expect(try Fixtures.messages("get missing link (error)") == [.error(errno: 19)])  // ENODEV
    }

    @Test func deletions() throws {
        let deleted = try Fixtures.messages("addr del 192.0.2.1/24 dev d0")
        guard case .delAddress(let a) = deleted.first else {
            Issue.record("expected delAddress, got \(deleted)")
            return
        }
        #expect(a.address == "192.0.2.1" && a.interfaceIndex == 3)
        let linkGone = try Fixtures.messages("link del b0")
        guard case .delLink(let l) = linkGone.first else {
            Issue.record("expected delLink, got \(linkGone)")
            return
        }
        #expect(l.name == "b0" && l.index == 6)
    }

    /// The bridge driver reuses RTM_NEWLINK/RTM_DELLINK with AF_BRIDGE for port state; a port leaving
    /// its bridge must not look like the link being deleted.
    @Test func bridgeFamilyLinkMessagesAreOther() throws {
        let messages = try Fixtures.messages("link del d0")
        #expect(messages.contains(.other(type: 17)))
        let deletedLinks = messages.compactMap { if case .delLink(let l) = $0 { l.name } else { nil } }
        #expect(deletedLinks == ["d0", "d0p"])
        #expect(try Fixtures.messages("enslave d0p to bridge (AF_BRIDGE messages)").contains(.other(type: 16)))
    }
}
